"""Device benchmark: what summing the adapter gradients over two local ranks costs, per backend and staging.

    python benchmarks/allreduce.py                 # 74.3 MB of fp32 (the 26B preset's LoRA r=16 gradients)
    python benchmarks/allreduce.py --mbytes 25     # one overlap bucket

Two processes (spawned, gloo's TCP store on localhost) each hold the gradient on their GPU (``cuda:RANK``, or
both on ``cuda:0`` when there is one GPU: the gloo rows then still measure the host side, the NCCL row is
skipped; without a GPU, on the CPU: the shared-memory and host-only rows) and time one sum per variant:

- ``gloo shm``: ``train.dist_backend: gloo`` as trained on one host: each rank's D2H into its slot of a shared
  page-locked buffer, a barrier, the H2D of every slot and their sum on the GPU (``local_sum.LocalSum``).
- ``gloo pinned``: gloo's own sum on the host of a copy in a reused page-locked buffer (``HostStaging``; what
  gloo on GPUs does across hosts).
- ``gloo pageable``: the same through ``tensor.cpu()`` (pageable, allocated per call: before ``HostStaging``).
- ``gloo host only``: gloo's sum of a host tensor alone (what the copies add is the difference).
- ``nccl``: the default on GPUs (two GPUs only).

Prints the median over ``--repeats`` calls after two warm-ups, and the achieved bandwidth (bytes / time);
writes ``benchmarks/results/allreduce-<gpu>-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("gloo shm", "gloo pinned", "gloo pageable", "gloo host only", "nccl")


def _time(fn: Any, repeats: int, sync: Any) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after two warm-ups; every call ends synchronised."""
    times = []
    for i in range(repeats + 2):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _pageable_sum(values: Any) -> None:
    import torch.distributed as dist

    host = values.cpu()  # the host waits for the D2H
    dist.all_reduce(host)
    values.copy_(host)


def _staged_sum(values: Any, staging: Any) -> None:
    import torch.distributed as dist

    from streamtune.distributed.context import on_host

    with on_host(values, "gloo", staging) as host:
        dist.all_reduce(host)


def _rank(rank: int, args: argparse.Namespace, port: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    from streamtune.distributed.context import DistContext

    gpus = torch.cuda.device_count()
    device = torch.device("cuda", rank % gpus) if gpus else torch.device("cpu")
    if gpus:
        torch.cuda.set_device(device)
    numel = int(args.mbytes * 1e6) // 4
    values = torch.full((numel,), float(rank + 1), device=device)
    expected = torch.full_like(values, 3.0)  # 1 + 2
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2, local_rank=rank, local_world_size=2, backend="gloo", device=device)
    sync = torch.cuda.synchronize if gpus else (lambda: None)
    rows: dict[str, float | None] = {}
    for variant in VARIANTS:
        if (variant == "nccl" and gpus < 2) or (not gpus and variant in ("gloo pinned", "gloo pageable")):
            rows[variant] = None
            continue
        if variant == "nccl":
            group = dist.new_group([0, 1], backend="nccl")
            run = (lambda: dist.all_reduce(values, group=group))
        elif variant == "gloo shm":  # as training sums GPU tensors (and CPU ones with STREAMTUNE_LOCAL_SUM=1)
            run = (lambda: ctx._local_sum(values).sum_(values))
        elif variant == "gloo pinned":
            run = (lambda: _staged_sum(values, ctx.staging))
        elif variant == "gloo pageable":
            run = (lambda: _pageable_sum(values))
        else:
            host = values.cpu()
            run = (lambda: dist.all_reduce(host))
        values.fill_(rank + 1)
        run()
        if variant != "gloo host only":  # the first sum is right (the timed ones grow the values; not checked)
            torch.testing.assert_close(values, expected)
        rows[variant] = _time(run, args.repeats, sync)
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbytes", type=float, default=74.3424, help="MB of fp32 gradients (default: 26B, r=16)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    import torch
    import torch.multiprocessing as mp

    sys.path.insert(0, str(REPO / "src"))
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_rank, args=(rank, args, args.port, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    rows = queue.get(timeout=600)
    for proc in procs:
        proc.join()
    nbytes = int(args.mbytes * 1e6) // 4 * 4
    print(f"\nsum of {nbytes / 1e6:.1f} MB over 2 ranks ({torch.cuda.device_count()} GPU(s), "
          f"{os.cpu_count()} CPUs), median of {args.repeats}")
    print(f"{'variant':16} {'ms':>8} {'GB/s':>8}")
    for variant, seconds in rows.items():
        print(f"{variant:16} " + ("     n/a      n/a" if seconds is None else
                                  f"{seconds * 1e3:>8.1f} {nbytes / seconds / 1e9:>8.2f}"))
    gpu = torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "cpu"
    path = Path(args.out) / f"allreduce-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "bytes": nbytes, "gpus": torch.cuda.device_count(),
                                "seconds": rows, "torch": torch.__version__}, indent=1))
    print(f"wrote {path}")
    return 0 if all(proc.exitcode == 0 for proc in procs) else 1


if __name__ == "__main__":
    sys.exit(main())
