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


def test_rank_times_are_medians_per_rank_without_the_first_step():
    log = ["  [rank 0 step 1] step 30.000 s, micro-batches 29.000 s\n",
           "[rank 0 step 2] step 0.900 s, micro-batches 0.800 s\n", "noise\n",
           "[rank 1 step 2] step 0.910 s, micro-batches 0.700 s\n",
           "[rank 1 step 3] step 0.950 s, micro-batches 0.750 s\n",
           "[rank 1 step 4] step 0.930 s, micro-batches 0.760 s\n"]
    times = multi_gpu._rank_times(log)
    assert times["0"] == {"step_s": 0.9, "micro_batches_s": 0.8}
    assert times["1"] == {"step_s": 0.93, "micro_batches_s": 0.75}
