"""The planner against every measured `streamtune bench` point of the current fast path (issue 12: step time and
tensor peak within 10 %), each recomputed with the link its run measured. A planner change that moves a
prediction out of that band fails here, before a GPU run shows it."""

import json
from pathlib import Path

import pytest

from streamtune.bench.common import bench_config
from streamtune.bench.run import _link_profile
from streamtune.plan import make_plan

GIB = 2**30
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# the H200 runs of the current build (compiled layers, batched decode, collector policy); older runs predate it
CURRENT_RUNS = {
    "stream_step-NVIDIA_H200-int8-20261201-015334-with-stock.json": "int8",
    "stream_step-NVIDIA_H200-int8-20261201-001057.json": "int8",
    "stream_step-NVIDIA_H200-nf4-20261201-033201-with-stock.json": "nf4",
    "stream_step-NVIDIA_H200-bf16-20261201-001418.json": "bf16",
    "stream_step-NVIDIA_H200-bf16-20261201-051614-with-stock.json": "bf16",
}


def _points():
    for name, codec in CURRENT_RUNS.items():
        run = json.loads((RESULTS / name).read_text())
        for row in run["results"]:
            if row["variant"] == "streamtune" and not row.get("error"):
                yield pytest.param(run, codec, row, id=f"{codec}-{row['tokens']}-{name[-30:-5]}")


@pytest.mark.parametrize("run,codec,row", list(_points()))
def test_planner_is_within_ten_percent_of_the_measured_step_and_peak(run, codec, row):
    args = run["args"]
    plan = make_plan(bench_config(args.get("model", "gemma4-26b-a4b"), args.get("num_layers")), codec=codec,
                     tokens=row["tokens"], lora_rank=args.get("lora_rank", 16), lora_targets=None,
                     gpu_budget_bytes=int(args.get("gpu_budget_gib", 24) * GIB), ring_slots=args.get("ring_slots", 2),
                     link=_link_profile(run["link"]), loss_chunk_tokens=args.get("loss_chunk_tokens"), suggest=False,
                     kernels=args.get("kernels", "auto"))
    assert len(plan.streamed_indices) == row["extra"]["num_streamed"]  # the placement the run measured
    assert plan.step_seconds == pytest.approx(row["step_s"], rel=0.10)
    assert plan.tensor_peak_bytes == pytest.approx(row["gpu_peak_bytes"], rel=0.10)
