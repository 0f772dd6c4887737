"""benchmarks/fast_step_experts.py (the ``experts`` piece of fast_step.py) on tiny shapes on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.mark.parametrize("preset", ["tiny-gemma4", "tiny-mixtral"])
def test_experts_piece_compares_peft_and_fast_path(preset):
    from fast_step_experts import compare_experts

    from streamtune.models.presets import preset_config

    result = compare_experts(preset_config(preset), 64, 4, torch.device("cpu"), torch.float32, warmup=0, repeats=1)
    assert result["route"] == "loop" and result["fast"]["calls"] == 2  # one forward per timed and checked step
    assert result["eager"]["s"] > 0 and result["fast"]["s"] > 0 and result["fast"]["host_syncs"] is None
    assert result["out_rel_err"] < 1e-5 and result["grad_cosine_min"] > 0.99999
    assert len(result["grad_cosine"]) == 4  # lora_A/lora_B of gate_up_proj and down_proj


def test_profile_categories_count_kernels_once():
    """A compiled graph's GPU range ("## Call CompiledFxGraph ... ##") and ATen ops are not kernels of their own."""
    from types import SimpleNamespace

    from fast_step import categorise
    from torch.autograd import DeviceType

    def event(name, us, device=DeviceType.CUDA, count=1):
        return SimpleNamespace(key=name, count=count, self_device_time_total=us, device_type=device)

    events = [event("triton_tem_fused_flex_attention_backward_1", 2000.0, count=2),
              event("## Call CompiledFxGraph fklsqnimpjr6gjp4bk5io6pximwdgehjmyyoxt6ztzd3tmi42llq ##", 2000.0),
              event("aten::mm", 500.0), event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", 500.0),
              event("cudaLaunchKernel", 0.0, DeviceType.CPU, count=3)]
    result = categorise(SimpleNamespace(key_averages=lambda: events))
    assert result["category_ms"]["attention"] == 2.0 and result["category_ms"]["gemm"] == 0.5
    assert result["kernel_ms"] == 2.5 and result["launches"] == 3
