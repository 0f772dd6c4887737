"""benchmarks/profile_step.py and its kernel categories (benchmarks/fast_step.py) on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


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


def test_profile_step_stages_switch_pieces_on_a_live_model():
    """benchmarks/profile_step.py --stages: each change lands on the model and in the returned choice."""
    import dataclasses

    from profile_step import apply_stage

    from streamtune.config import LoraConfig
    from streamtune.kernels import apply_kernels, select_kernels
    from streamtune.lora import attach_lora
    from streamtune.models.build import build_model

    model, adapter = build_model("tiny-gemma4", torch.float32, seed=1)
    model = attach_lora(model, adapter, LoraConfig(rank=4, alpha=8), seed=0)
    choice = dataclasses.replace(select_kernels("auto", "cpu", "float32"), fast_experts=True, fused_norm_act=True)
    apply_kernels(model, choice)

    def patched_experts():
        return sum("forward" in m.__dict__ for m in model.modules() if hasattr(m, "gate_up_proj"))

    layers = model.config.num_hidden_layers
    assert patched_experts() == layers
    choice = apply_stage(model, choice, "-fast_experts")
    assert patched_experts() == 0 and not choice.fast_experts
    choice = apply_stage(model, choice, "+fast_experts")
    assert patched_experts() == layers and choice.fast_experts
    def fused_norms():
        return sum(bool(getattr(m, "_streamtune_fused_norm", False)) for m in model.modules())

    assert fused_norms() > 0
    choice = apply_stage(model, choice, "-fused_norm_act")
    assert not choice.fused_norm_act and fused_norms() == 0
    choice = apply_stage(model, choice, "flex512=m64n32_s2")
    assert choice.kernel_options(512)["num_stages"] == 2
    for bad in ("+compile_layers", "+nonsense"):
        with pytest.raises(SystemExit, match="cannot apply"):
            apply_stage(model, choice, bad)
