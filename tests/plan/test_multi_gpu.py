"""Two unequal GPUs: data parallel with per-rank plans against a layer split, and the host line of
ranks that share one copy of the weights."""

from __future__ import annotations

import json

import pytest

from streamtune import hostmem
from streamtune.cli import main
from streamtune.plan import GPU_PROFILES, make_plan, memory
from streamtune.plan.multi_gpu import format_multi, plan_gpus
from streamtune.plan.profiles import replace, resolve_gpu_list

GIB = 2**30
MODEL = "gemma4-26b-a4b"


def test_rtx_pro_2000_profile():
    card = GPU_PROFILES["rtx-pro-2000"]
    assert card.gpu_memory_bytes == 16 * GIB
    assert card.h2d_gbps < GPU_PROFILES["h200"].h2d_gbps  # PCIe 5 x8: half the x16 link
    assert card.matmul_tflops < GPU_PROFILES["rtx4090"].matmul_tflops
    assert [p.gpu_name for p in resolve_gpu_list("RTX4090, rtx-pro-2000")] == ["rtx4090", "rtx-pro-2000"]


def test_shared_host_copy_is_counted_once(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(hostmem, "default_compile_workers", lambda: 32)
    one = make_plan(MODEL, codec="int8", gpu="rtx4090")
    two = make_plan(MODEL, codec="int8", gpu="rtx4090", local_ranks=2)
    assert two.host_bytes["pinned_weights"] == one.host_bytes["pinned_weights"]
    assert two.host_bytes["staging"] == one.host_bytes["staging"]
    # each rank adds its runtime and its share of the process group (measured: 1.84 GB alone, 2.06 GB each of two)
    assert two.host_bytes["runtime"] == 2 * (one.host_bytes["runtime"] + memory.PROCESS_GROUP_HOST_BYTES)
    assert two.host_bytes["compile_workers"] == one.host_bytes["compile_workers"]  # the host's pool, shared
    # a gloo rank loads no NCCL: its runtime and its two 16 MiB slots of the shared gradient sum
    gloo = make_plan(MODEL, codec="int8", gpu="rtx4090", local_ranks=2, dist_backend="gloo")
    assert gloo.host_bytes["runtime"] == 2 * (one.host_bytes["runtime"] + 2 * 16 * 2**20)


def test_compile_workers_are_each_ranks_pool_times_the_local_ranks(monkeypatch):
    """Inside a torchrun rank ``share_compile_workers`` has set the variable to the rank's share, and a user's
    setting is per process too: the host holds one pool per local rank."""
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "16")
    two = make_plan(MODEL, codec="int8", gpu="rtx4090", local_ranks=2)
    assert two.host_bytes["compile_workers"] == 32 * memory.COMPILE_WORKER_HOST_BYTES
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "0")  # compiles in the rank's own process
    assert make_plan(MODEL, codec="int8", gpu="rtx4090", local_ranks=2).host_bytes["compile_workers"] == 0


def test_host_peak_counts_the_larger_of_loading_staging_and_the_compile_workers(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "32")
    fast = make_plan(MODEL, codec="int8", gpu="rtx4090")
    host = fast.host_bytes
    assert host["compile_workers"] == 32 * memory.COMPILE_WORKER_HOST_BYTES
    lasting = host["pinned_weights"] + host["runtime"]
    assert fast.host_peak_bytes == lasting + max(host["staging"], host["compile_workers"])
    eager = make_plan(MODEL, codec="int8", gpu="rtx4090", kernels="eager")
    assert eager.host_bytes["compile_workers"] == 0  # nothing compiles
    assert eager.host_peak_bytes == lasting + host["staging"]


def test_unequal_pair_splits_work_towards_the_faster_gpu():
    plan = plan_gpus(MODEL, resolve_gpu_list("rtx4090,rtx-pro-2000"), codec="int8", tokens=2048, micro_batches=8)
    dp, ls = plan.data_parallel, plan.layer_split
    assert dp is not None and ls is not None
    fast, slow = dp["ranks"]
    assert fast["micro_batch_seconds"] < slow["micro_batch_seconds"]
    assert dp["split"][0] > dp["split"][1] and sum(dp["split"]) == 8
    assert dp["step_seconds"] <= dp["even_step_seconds"]
    assert fast["gpu_peak_bytes"] <= 24 * GIB and slow["gpu_peak_bytes"] <= 16 * GIB
    assert all(g["gpu_peak_bytes"] <= b for g, b in zip(ls["gpus"], plan.budgets_bytes))
    assert sum(g["layers"] for g in ls["gpus"]) == 30
    assert 1e6 < ls["crossing_bytes"] < 100e6  # tens of MB per crossing
    best = min(("data_parallel", dp["step_seconds"]), ("layer_split", ls["step_seconds"]), key=lambda x: x[1])
    assert plan.choice == best[0] and plan.reason


def test_slow_links_make_the_layer_split_win():
    """When streaming dominates, two memories that together hold the model beat two GPUs streaming it each."""
    gpus = [replace(GPU_PROFILES["rtx4090"], h2d_gbps=2.0), replace(GPU_PROFILES["rtx-pro-2000"], h2d_gbps=2.0)]
    plan = plan_gpus(MODEL, gpus, codec="int8", tokens=512, micro_batches=4)
    assert plan.choice == "layer_split"
    assert plan.layer_split["step_seconds"] < plan.data_parallel["step_seconds"]
    text = format_multi(plan)
    assert "picks: layer split" in text and "not built yet" not in text and "planner only" not in text
    k = plan.layer_split["split_layer"]
    assert f"train.devices: [cuda:0, cuda:1]" in text and f"memory.layer_split: {k}" in text
    assert "train.grad_accum: 4" in text and "memory.gpu_budgets: [" in text


def test_cli_two_gpus(capsys):
    assert main(["plan", MODEL, "--gpu", "rtx4090,rtx-pro-2000", "--codec", "int8", "--host-memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "data parallel:" in out and "layer split:" in out and "picks:" in out and "s/step" in out
    assert main(["plan", MODEL, "--gpu", "h200,h200", "--gpu-memory", "24GiB,16GiB", "--codec", "int8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budgets_bytes"] == [24 * GIB, 16 * GIB] and data["choice"] in ("data_parallel", "layer_split")
    assert "layer_split_implemented" not in data
    if data["layer_split"] is not None:
        assert data["layer_split"]["boundaries"] == [data["layer_split"]["split_layer"]]
        assert data["layer_split"]["crossings_per_micro_batch"] == 4


@pytest.mark.parametrize("argv, key", [
    (["--gpu", "rtx4090,voodoo2"], "--gpu"),
    (["--gpu", "rtx4090,rtx-pro-2000", "--gpu-memory", "24GiB,16GiB,8GiB"], "--gpu-memory"),
    (["--gpu", "rtx4090,rtx-pro-2000", "--micro-batches", "1"], "--micro-batches"),
])
def test_cli_bad_multi_gpu_input(argv, key, capsys):
    assert main(["plan", MODEL, *argv]) == 2
    assert key in capsys.readouterr().err


def test_plan_split_is_the_layer_split_the_comparison_shows_and_its_lines_load():
    from streamtune.config import load, parse_layer_split
    from streamtune.errors import InputError
    from streamtune.plan.multi_gpu import plan_split, run_lines

    gpus = [replace(GPU_PROFILES["rtx4090"], h2d_gbps=2.0), replace(GPU_PROFILES["rtx-pro-2000"], h2d_gbps=2.0)]
    kwargs = {"codec": "int8", "tokens": 512}
    compared = plan_gpus(MODEL, gpus, [24 * GIB, 16 * GIB], micro_batches=4, **kwargs).layer_split
    auto = plan_split(MODEL, gpus, [24 * GIB, 16 * GIB], None, micro_batches=4, **kwargs)
    fixed = plan_split(MODEL, gpus, [24 * GIB, 16 * GIB], [compared["split_layer"]], micro_batches=4, **kwargs)
    for got in (auto, fixed):
        assert got["split_layer"] == compared["split_layer"]
        assert got["step_seconds"] == pytest.approx(compared["step_seconds"])
        assert [g["streamed_indices"] for g in got["gpus"]] == [g["streamed_indices"] for g in compared["gpus"]]
    assert all(i >= compared["split_layer"] for i in auto["gpus"][1]["streamed_indices"])
    overrides = [line.replace(": ", "=", 1).replace(" ", "") for line in run_lines(auto, [24 * GIB, 16 * GIB])]
    cfg = load(None, ["data.path=x.jsonl", *overrides])
    assert cfg.train.devices == ["cuda:0", "cuda:1"] and cfg.memory.gpu_budgets == ["24GiB", "16GiB"]
    assert parse_layer_split(cfg.memory.layer_split) == [auto["split_layer"]] and cfg.train.grad_accum == 4
    with pytest.raises(InputError, match="memory.layer_split"):
        plan_split(MODEL, gpus * 2, [24 * GIB] * 4, None, micro_batches=4, **kwargs)
    with pytest.raises(InputError, match="train.devices"):
        plan_split(MODEL, gpus, [GIB // 4, GIB // 4], [2], micro_batches=4, **kwargs)


def test_gloo_data_parallel_plans_the_shared_memory_sum_and_no_nccl_host_memory():
    from streamtune.plan.multi_gpu import local_sum_seconds, plan_gpus
    from streamtune.plan.profiles import resolve_gpu_list

    gpus = resolve_gpu_list("rtx4090,rtx-pro-2000")
    nccl = plan_gpus(MODEL, gpus, micro_batches=4, codec="int8")
    gloo = plan_gpus(MODEL, gpus, micro_batches=4, codec="int8", dist_backend="gloo")
    grads = nccl.data_parallel["allreduce_bytes"]
    # one D2H and two H2D copies on the slower link
    assert gloo.data_parallel["allreduce_seconds"] == local_sum_seconds(grads, gpus) == pytest.approx(
        3 * grads / (min(g.h2d_gbps for g in gpus) * 1e9))
    assert (nccl.data_parallel["allreduce_path"], gloo.data_parallel["allreduce_path"]) == ("NCCL", "shared memory (gloo)")
    assert gloo.host_bytes["runtime"] < nccl.host_bytes["runtime"]
