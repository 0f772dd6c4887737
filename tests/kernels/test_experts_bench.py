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

