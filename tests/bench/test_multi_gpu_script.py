"""benchmarks/multi_gpu.py's run configs load as streamtune configs, with the asked placement."""

from __future__ import annotations

import sys
from pathlib import Path

from streamtune.config import load

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import host_sampler  # noqa: E402
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


def test_shared_weight_pages_are_summed_per_numa_node():
    maps = ("7f0000000000 default file=/dev/shm/streamtune-1/0.bin mapped=4 N0=3 N1=1 kernelpagesize_kB=4\n"
            "7f1000000000 default anon=10 dirty=10 N0=10 kernelpagesize_kB=4\n"
            "7f2000000000 bind:1 file=/dev/shm/streamtune-1/1.bin mapped=2 N1=2 kernelpagesize_kB=2048\n")
    assert multi_gpu._shm_pages_per_node(maps) == {0: 3 * 4096, 1: 4096 + 2 * 2 * 2**20}
    assert "shared weights" in multi_gpu._topology_brief()


def test_job_pss_counts_a_ranks_children_as_other_processes():
    """A rank's children (Inductor's compile workers) inherit LOCAL_RANK from it; they are not ranks."""
    import os
    import subprocess
    import time

    import psutil

    worker = "b = bytearray(80_000_000); import time; time.sleep(60)"  # 80 MB of touched pages
    rank = f"{sys.executable} -c '{worker}'; true"  # `; true`: bash stays as the rank, the worker is its child
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    launcher = subprocess.Popen(["bash", "-c", f"env LOCAL_RANK=0 bash -c \"{rank}\"; true"], env=env)
    try:
        for _ in range(100):
            ranks, others = host_sampler.job_pss_bytes(launcher.pid)
            if others > 80e6:
                break
            time.sleep(0.1)
        assert others > 80e6 and ranks < 20e6, (ranks, others)
    finally:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            child.kill()
        launcher.kill()
        launcher.wait()


def test_run_phases_follow_the_logged_steps():
    assert [host_sampler.run_phase(n, False) for n in (-1, 0, 1, 2, 3, 9)] == [0, 1, 2, 2, 3, 3]
    assert host_sampler.run_phase(9, True) == 0


def test_host_sampler_keeps_a_pss_only_in_the_phase_it_was_measured_in():
    measured = iter([(10, 5), (20, 1), (30, 2), (40, 3)])
    sampler = host_sampler.HostSampler(lambda: next(measured))
    # a PSS on entering each phase, and every PSS_EVERY_SAMPLES samples: phase 2's PSS (compile workers alive)
    # must not reach the steady maximum
    phases = [1] + [2] * (host_sampler.PSS_EVERY_SAMPLES - 1) + [3, 3]
    for index, phase in enumerate(phases):
        sampler.sample(phase, 100 + index)
    assert [s[2] for s in sampler.samples] == [10] + [20] * (host_sampler.PSS_EVERY_SAMPLES - 1) + [30, 30]
    summary = sampler.summary()
    assert summary["host_steady_rank_pss_bytes"] == 30 and summary["host_steady_other_pss_bytes"] == 2
    assert summary["host_train_pss_bytes"] == 32 and summary["host_steady_bytes"] == 100 + len(phases) - 1
    assert summary["host_peak_bytes"] == 100 + len(phases) - 1


def test_one_gpu_is_refused_with_nccl_or_modes_that_need_two_gpus():
    import pytest

    for argv in (["--one-gpu", "--modes", "dp1,dp2"], ["--one-gpu", "--dist-backend", "gloo", "--modes", "caps"]):
        with pytest.raises(SystemExit, match="--one-gpu: only with --dist-backend gloo"):
            multi_gpu.main(argv)
