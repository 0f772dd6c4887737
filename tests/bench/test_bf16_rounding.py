"""benchmarks/bf16_rounding.py: a random model's bf16 LoRA gradients against its fp32 ones, for both fills."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bf16_rounding  # noqa: E402


def test_both_fills_compare_every_lora_gradient(capsys):
    assert bf16_rounding.main(["--preset", "tiny-gemma4", "--num-layers", "2", "--tokens", "64"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " fill: " in line]
    assert [line.split()[0] for line in lines] == ["bench", "iid"]
    for line in lines:
        count, low, median = re.search(r"over (\d+) tensors: min ([-\d.]+), median ([-\d.]+)", line).groups()
        assert int(count) > 0 and 0.5 < float(low) <= float(median) <= 1.0 + 1e-6, line
