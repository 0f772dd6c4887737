"""benchmarks/bf16_rounding.py: a random model's bf16 LoRA gradients against its fp32 ones, for each fill; and the
conditioned fill of benchmarks/random_weights.py sets every norm it names."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bf16_rounding  # noqa: E402


def test_every_fill_compares_every_lora_gradient(capsys):
    assert bf16_rounding.main(["--preset", "tiny-gemma4", "--num-layers", "2", "--tokens", "64"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " fill: " in line]
    assert [line.split()[0] for line in lines] == ["bench", "iid", "conditioned"]
    for line in lines:
        count, low, median = re.search(r"over (\d+) tensors: min ([-\d.]+), median ([-\d.]+)", line).groups()
        assert int(count) > 0 and 0.5 < float(low) <= float(median) <= 1.0 + 1e-6, line


def test_the_conditioned_fill_sets_the_qk_norms_and_every_post_branch_norm():
    import torch

    from random_weights import CONDITIONED_NORMS, condition_fill_
    from streamtune.bench.common import bench_config, build_random_model

    model = build_random_model(bench_config("tiny-gemma4", 2))
    assert condition_fill_(model) > 0
    norms = {name: float(p.float().mean()) for name, p in model.named_parameters() if "norm" in name}
    for key, value in CONDITIONED_NORMS.items():
        matching = {n: v for n, v in norms.items() if f".{key}" in n}
        if key != "post_per_layer_input_norm":  # tiny-gemma4 has no per-layer inputs
            assert matching, key
        assert all(abs(v - value) < 1e-3 for v in matching.values()), matching  # bf16 weights
    # the MoE block's two extra post-norms too, and the pre-norms untouched
    assert any(n.endswith("post_feedforward_layernorm_2.weight") for n in norms)
    assert all(v == 1.0 for n, v in norms.items() if ".input_layernorm" in n or "pre_feedforward" in n)
    assert torch.isfinite(next(model.parameters())).all()
