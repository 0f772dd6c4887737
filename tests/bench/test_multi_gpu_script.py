"""benchmarks/multi_gpu.py's run configs load as streamtune configs, with the asked placement."""

from __future__ import annotations

import sys
from pathlib import Path

from streamtune.config import load

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import multi_gpu  # noqa: E402


def test_run_config_loads_with_the_asked_stream_mode(tmp_path):
    args = multi_gpu._args(["--device", "cpu", "--stream", "all", "--seq-len", "128", "--steps", "2"])
    path = multi_gpu._config(tmp_path, args, "dp2", grad_accum=2, tokenizer_dir=tmp_path / "tok")
    cfg = load(path, [])
    assert cfg.memory.stream == "all" and cfg.train.device == "cpu" and cfg.data.seq_len == 128
    assert cfg.train.grad_accum == 2 and cfg.train.max_steps == 2
    assert load(multi_gpu._config(tmp_path, multi_gpu._args([]), "dp1", 4, tmp_path)).memory.stream == "auto"
