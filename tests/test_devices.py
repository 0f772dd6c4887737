"""The planner's profile of the card it runs on (cached when measured on this card, else measured, else named),
and `train.device` / `model.dtype` as torch objects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from streamtune import devices
from streamtune.plan.profiles import DECODE_TIMING_NUMEL, GPU_PROFILES, load_link_profile, save_link_profile

H200_BYTES = 150_000_000_000


@pytest.fixture
def fake_h200(monkeypatch):
    """torch.cuda answering as one H200; quick_link counted."""
    props = SimpleNamespace(name="NVIDIA H200", total_memory=H200_BYTES)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    calls = []

    def quick_link(device):
        calls.append(device)
        return {"gpu_name": props.name, "gpu_memory_bytes": H200_BYTES, "h2d_gbps": 55.0, "matmul_tflops": 790.0,
                "dequant_gbps": {"int8": 1500.0, "nf4": 1100.0}, "decode_numel": DECODE_TIMING_NUMEL}

    monkeypatch.setattr(devices, "quick_link", quick_link)
    return calls


def test_measures_once_and_caches(fake_h200, tmp_path):
    path = tmp_path / "link.json"
    profile = devices.detect_link_profile(path=path)
    assert fake_h200 == [torch.device("cuda", 0)]
    assert profile.gpu_name == "NVIDIA H200" and profile.h2d_gbps == 55.0
    assert profile.matmul_tflops == pytest.approx(790.0 * devices.PLANNER_MATMUL_FRACTION)
    assert profile.source == str(path)
    again = devices.detect_link_profile(path=path)
    assert len(fake_h200) == 1 and again == profile


def test_cache_of_another_card_is_measured_again(fake_h200, tmp_path):
    path = tmp_path / "link.json"
    save_link_profile(25.0, 90.0, "NVIDIA GeForce RTX 4090", {}, path=path)
    profile = devices.detect_link_profile(path=path)
    assert len(fake_h200) == 1 and profile.gpu_name == "NVIDIA H200"
    assert load_link_profile(path).gpu_name == "NVIDIA H200"


def test_cache_timed_on_a_small_decode_is_measured_again(fake_h200, tmp_path, capsys):
    """Profiles cached before the decode was timed on DECODE_TIMING_NUMEL elements had launch-bound decode speeds."""
    path = tmp_path / "link.json"
    save_link_profile(55.0, 600.0, "NVIDIA H200", {"int8": 404.0, "nf4": 160.0}, path=path)  # no decode_numel
    assert devices.detect_link_profile(path=path, measure=False).dequant_gbps["nf4"] == 160.0
    assert fake_h200 == []
    profile = devices.detect_link_profile(path=path)
    assert len(fake_h200) == 1 and profile.dequant_gbps["nf4"] == 1100.0
    assert profile.decode_numel == DECODE_TIMING_NUMEL == load_link_profile(path).decode_numel
    assert "timed on a smaller tensor" in capsys.readouterr().err
    devices.detect_link_profile(path=path)
    assert len(fake_h200) == 1


def test_failed_measurement_falls_back_to_the_named_profile(fake_h200, monkeypatch, tmp_path):
    def oom(device):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(devices, "quick_link", oom)
    profile = devices.detect_link_profile(path=tmp_path / "link.json")
    assert profile.matmul_tflops == GPU_PROFILES["h200"].matmul_tflops
    assert profile.gpu_memory_bytes == H200_BYTES
    assert "default h200" in profile.source and "NVIDIA H200" in profile.source
    no_measure = devices.detect_link_profile(path=tmp_path / "link.json", measure=False)
    assert no_measure.matmul_tflops == GPU_PROFILES["h200"].matmul_tflops


def test_plan_header_names_the_detected_profile(fake_h200, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from streamtune.cli import main

    assert main(["plan", "gemma4-26b-a4b", "--codec", "int8", "--gpu-memory", "24GiB", "--host-memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "link: NVIDIA H200 (" + str(tmp_path / "streamtune" / "link.json") + ")" in out
    assert "H2D 55.0 GB/s" in out


def test_without_cuda_it_refuses(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        devices.detect_link_profile()


def test_plan_on_device_uses_the_card_and_caps_the_allocator(fake_h200, monkeypatch, tmp_path, run_dict):
    from streamtune.config import from_dict
    from streamtune.errors import InputError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (H200_BYTES - 2**30, H200_BYTES))
    caps = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: caps.append(fraction))
    cfg = from_dict(run_dict(tmp_path / "run", memory={"gpu_budget": "24GiB"}))
    plan = devices.plan_on_device(cfg, torch.device("cuda", 0))
    assert plan.link.gpu_name == "NVIDIA H200" and plan.gpu_budget_bytes == 24 * 2**30
    assert caps == [pytest.approx(24 * 2**30 / H200_BYTES)]
    too_small = from_dict(run_dict(tmp_path / "run", memory={"gpu_budget": "1MiB"}))
    with pytest.raises(InputError, match="does not fit"):
        devices.plan_on_device(too_small, torch.device("cuda", 0))
    assert len(caps) == 1  # refused before the allocator is capped


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_train_device_cuda_without_cuda_names_the_key_and_the_fix():
    from streamtune.devices import resolve_device
    from streamtune.errors import InputError

    with pytest.raises(InputError, match=r"train.device: cuda asked for.*train.device=cpu or auto"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_model_dtype_auto_is_bf16_on_cuda_and_fp32_on_the_cpu():
    from streamtune.devices import resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
