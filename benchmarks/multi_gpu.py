"""Device benchmark: data parallel on 1 and 2 GPUs with the real trainer (torchrun), host RAM per rank count,
and unequal caps (24/16 GiB) against the planner's layer-split prediction.

    python benchmarks/multi_gpu.py                      # 26B preset, int8, 2048 tokens, 24 GiB cap per GPU
    python benchmarks/multi_gpu.py --num-layers 4       # smoke run (minutes less loading)
    python benchmarks/multi_gpu.py --modes dp1,dp2      # a subset

Modes (each one ``torchrun --standalone`` job of ``streamtune.train`` on the preset with random weights):

- ``dp1``: 1 GPU, cap ``--cap-gib``, ``grad_accum = --micro-batches``.
- ``dp2``: 2 GPUs, same cap each, ``grad_accum = --micro-batches / 2``: the same global batch.
- ``caps``: 2 GPUs capped ``--caps`` (24,16 GiB), the micro-batches split as ``streamtune plan`` predicts best
  (``STREAMTUNE_RANK_MICRO_BATCHES``); printed next to the planner's data-parallel and layer-split predictions.
- ``split``: the layer split on the same pair: one process (``train.devices: [cuda:0, cuda:1]``,
  ``memory.gpu_budgets`` = ``--caps``, ``memory.layer_split: auto``), ``grad_accum = --micro-batches``: the
  same global batch. Reports each GPU's peak. ``--modes caps,split`` compares the two on one pair.

Per mode: tokens/s over the steps after the first (global tokens / rank 0's step time, from metrics.jsonl) and
host RAM in use by the job (MemTotal - MemAvailable, minus the value before launch; exact only on a machine
running nothing else) and the job's PSS (its processes' proportional set sizes: shared pages count once),
sampled every 0.5 s while steps run ("train"), and the peak over the whole job (it includes building the random
bf16 model in each rank).
Results go to ``benchmarks/results/multi_gpu-<gpu>-<time>.json``. Each mode builds and packs the preset anew;
if all three do not fit one 10-minute window, run ``--modes dp1,dp2`` and ``--modes caps`` separately.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import host_alloc  # beside this script
from host_sampler import HostSampler, job_pss_bytes, run_phase, used_bytes

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "quickstart.jsonl"
GIB = 2**30


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma4-26b-a4b")
    p.add_argument("--num-layers", type=int, default=None, help="cut the preset to N decoder layers (smoke runs)")
    p.add_argument("--codec", default="int8", choices=["bf16", "int8", "nf4"])
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per micro-batch (batch 1, packed)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per optimizer step (global, even)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per mode (the first is not timed)")
    p.add_argument("--cap-gib", type=float, default=24.0, help="GPU cap per GPU in dp1/dp2")
    p.add_argument("--caps", default="24,16", help="GiB caps of GPU 0 and 1 in the caps mode")
    p.add_argument("--modes", default="dp1,dp2,caps")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of the script (gloo)")
    p.add_argument("--stream", default="auto", choices=["auto", "all", "none"],
                   help="memory.stream (all: with --device cpu, a rank's own host RAM as on a GPU, weights streamed)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--trace-alloc", action="store_true",
                   help="trace each rank's Python allocations from placement on (slows the first step's compiles) "
                        "and print them by package beside glibc's heap counters")
    p.add_argument("--overlap-grad-reduce", action="store_true", help="train.overlap_grad_reduce: true in every mode")
    p.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="train.dist_backend in every mode (gloo: no NCCL in the ranks, gradients summed on the host)")
    p.add_argument("--trace-native", action="store_true",
                   help="rank 0 records its native allocations (memray, if installed) from placement to the end of "
                        "step 2 and prints what is still live by family and function (slow: use --num-layers)")
    p.add_argument("--keep-compile-workers", action="store_true",
                   help="the ranks keep Inductor's compile workers for the whole run (training stops them after "
                        "step 2): the A/B of that stop's effect on step time and host RAM")
    p.add_argument("--one-gpu", action="store_true",
                   help="dp2's two ranks both on cuda:0 (gloo only): a second rank's host RAM on a one-GPU machine; "
                        "its speed is not a two-GPU speed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-caps", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-split", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> int:
    """One rank (under torchrun): cut the preset if asked, cap this GPU, train."""
    import streamtune.models.build as build
    from streamtune.bench.common import bench_config
    from streamtune.config import load
    from streamtune.train import train

    if os.environ.get("STREAMTUNE_DUMP_AFTER_S"):  # a stalled job prints every thread's stack, repeatedly
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["STREAMTUNE_DUMP_AFTER_S"]), repeat=True)
    if args.num_layers:
        build.preset_config = lambda name: bench_config(name, args.num_layers)
    if args.one_gpu:
        import streamtune.distributed.context as context

        context.rank_cuda_index = lambda local_rank: 0
    threading.Thread(target=_report_private_memory, args=(Path(args.worker),), daemon=True).start()
    _trace_setup_memory(args.trace_alloc)
    _trace_step_times()
    if args.keep_compile_workers:
        import streamtune.train.recipe as recipe

        recipe.stop_compile_workers = lambda: 0
    if args.trace_native and os.environ.get("LOCAL_RANK", "0") == "0":
        host_alloc.trace_native_first_steps(str(Path(args.worker).with_suffix(".memray")), "rank 0")
    caps = [float(c) for c in args.worker_caps.split(",")]
    if args.worker_split:
        devices = ",".join(f"cuda:{i}" if args.device == "cuda" else "cpu" for i in range(len(caps)))
        cfg = load(args.worker, [f"train.devices=[{devices}]", "train.device=auto",
                                 f"memory.gpu_budgets=[{','.join(f'{c:g}GiB' for c in caps)}]"])
    else:
        cfg = load(args.worker, [])
        cfg.memory.gpu_budget = f"{caps[int(os.environ.get('LOCAL_RANK', '0'))]}GiB"
    train(cfg, keep_model=False)  # as `streamtune train`: no decoding of the base back into host RAM at the end
    return 0


def _private_memory_by_mapping() -> list[tuple[int, int, str]]:
    """This process's memory per mapping name from ``/proc/self/smaps``: ``(private bytes, PSS bytes, name)``,
    largest private first; anonymous mappings without a name are grouped as ``[anon]``."""
    sizes: dict[str, list[int]] = {}
    name = "[anon]"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:  # a mapping's header: range perms offset dev inode [path]
            name = fields[5] if len(fields) > 5 else "[anon]"
            if name.startswith("/dev/shm/"):
                name = "/dev/shm/*"
            sizes.setdefault(name, [0, 0])
        elif fields[0] in ("Private_Clean:", "Private_Dirty:"):
            sizes[name][0] += int(fields[1]) * 1024
        elif fields[0] == "Pss:":
            sizes[name][1] += int(fields[1]) * 1024
    return sorted(((priv, pss, n) for n, (priv, pss) in sizes.items()), reverse=True)


def _memory_brief() -> str:
    """This process's private memory now, in all and its three largest mappings."""
    rows = _private_memory_by_mapping()
    return (f"private {sum(priv for priv, _, _ in rows) / 1e9:.2f} GB ("
            + ", ".join(f"{n} {priv / 1e9:.2f}" for priv, _, n in rows[:3]) + ")")


def _trace_setup_memory(trace_alloc: bool = False) -> None:
    """Print this rank's private memory after each setup phase of the recipe (imports, process group and
    CUDA context, plan, model skeleton, placement): where a rank's own host RAM comes from. With
    ``trace_alloc``, trace Python allocations from placement on (:mod:`host_alloc`)."""
    from streamtune.train.recipe import Recipe

    rank = os.environ.get("LOCAL_RANK", "0")
    print(f"[rank {rank} memory after imports] {_memory_brief()}", flush=True)
    for phase in ("_init_distributed", "_plan", "_build_model", "_attach_and_place"):
        setattr(Recipe, phase, _traced(getattr(Recipe, phase), phase, rank, trace_alloc))


def _trace_step_times() -> None:
    """Print each rank's time per optimizer step and, within it, for its micro-batches (forward and backward, up to
    the device's last kernel): in data parallel a step waits for the slower rank, and these lines say which one
    that was and by how much (the rest of a step: collectives, clipping, the optimizer)."""
    import torch

    from streamtune.train.recipe import Recipe

    rank = os.environ.get("LOCAL_RANK", "0")
    accumulate, train_step = Recipe._accumulate, Recipe._train_step
    timings: dict[str, float] = {}

    def timed_accumulate(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = accumulate(self, *args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings["micro"] = time.perf_counter() - started
        return result

    def timed_step(self: Any, step: int, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = train_step(self, step, *args, **kwargs)
        print(f"[rank {rank} step {step}] step {time.perf_counter() - started:.3f} s, micro-batches "
              f"{timings.get('micro', float('nan')):.3f} s", flush=True)
        return result

    Recipe._accumulate, Recipe._train_step = timed_accumulate, timed_step


def _traced(method: Any, phase: str, rank: str, trace_alloc: bool = False) -> Any:
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        print(f"[rank {rank} memory after {phase.strip('_')}] {_memory_brief()}", flush=True)
        if phase == "_attach_and_place":
            print(f"[rank {rank} topology] {_topology_brief()}", flush=True)
            if trace_alloc:
                host_alloc.start()
        return result

    return run


def _topology_brief() -> str:
    """Where this rank runs: its GPU's NUMA node, the NUMA nodes of the shared packed weights' pages, its CPUs
    and threads. Two ranks streaming from one host copy: a GPU on the other socket reads across the socket link."""
    import torch

    parts = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        address = (f"{getattr(props, 'pci_domain_id', 0):04x}:{getattr(props, 'pci_bus_id', 0):02x}:"
                   f"{getattr(props, 'pci_device_id', 0):02x}.0")
        node = Path(f"/sys/bus/pci/devices/{address}/numa_node")
        parts.append(f"GPU {address} NUMA node {node.read_text().strip() if node.is_file() else '?'}")
    maps = Path("/proc/self/numa_maps")
    pages = _shm_pages_per_node(maps.read_text()) if maps.is_file() else {}
    parts.append("shared weights " + (", ".join(f"node {n} {b / 1e9:.2f} GB" for n, b in sorted(pages.items()))
                                      or "not mapped"))
    parts.append(f"CPUs {len(os.sched_getaffinity(0))}, torch threads {torch.get_num_threads()}, "
                 f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    return "; ".join(parts)


def _shm_pages_per_node(numa_maps: str) -> dict[int, int]:
    """Bytes per NUMA node of the ``/dev/shm`` mappings in a ``/proc/<pid>/numa_maps`` text."""
    by_node: dict[int, int] = {}
    for line in numa_maps.splitlines():
        if "/dev/shm/" not in line:
            continue
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        page_bytes = int(fields.get("kernelpagesize_kB", "4")) * 1024
        for key, value in fields.items():
            if key[:1] == "N" and key[1:].isdigit():
                by_node[int(key[1:])] = by_node.get(int(key[1:]), 0) + int(value) * page_bytes
    return by_node


def _report_private_memory(config_path: Path) -> None:
    """Once the third step is logged, print this rank's largest private mappings (where its own host RAM goes,
    beside the shared packed weights)."""
    import yaml

    metrics = Path(yaml.safe_load(config_path.read_text())["output"]["dir"]) / "metrics.jsonl"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:
        time.sleep(0.5)
    rows = _private_memory_by_mapping()
    rank = os.environ.get("LOCAL_RANK", "0")
    total_private = sum(priv for priv, _, _ in rows)
    status = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in
              Path("/proc/self/status").read_text().splitlines()) if k in ("RssAnon", "RssFile", "RssShmem")}
    import torch

    pinned = ""
    if torch.cuda.is_available() and hasattr(torch.cuda.memory, "host_memory_stats"):
        stats = torch.cuda.memory.host_memory_stats()
        pinned = (f"; torch pinned host allocator: {stats.get('allocated_bytes.current', 0) / 1e9:.2f} GB in use, "
                  f"{stats.get('reserved_bytes.current', 0) / 1e9:.2f} GB held")
    print(f"[rank {rank} host memory] private {total_private / 1e9:.2f} GB; "
          + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in status.items()) + pinned
          + "; largest mappings (private GB, PSS GB): "
          + "; ".join(f"{n} {priv / 1e9:.2f}/{pss / 1e9:.2f}" for priv, pss, n in rows[:8]), flush=True)
    print(f"[rank {rank} heap] {host_alloc.report()}", flush=True)


def _config(root: Path, args: argparse.Namespace, name: str, grad_accum: int, tokenizer_dir: Path) -> Path:
    import yaml

    raw = {
        "model": {"name": args.model, "tokenizer": str(tokenizer_dir)},
        "data": {"path": str(DATA), "format": "alpaca", "seq_len": args.seq_len, "pack": True},
        "lora": {"rank": 16, "alpha": 32},
        "memory": {"codec": args.codec, "stream": args.stream},
        "train": {"max_steps": args.steps, "lr": 1e-4, "warmup_steps": 1, "batch_size": 1, "grad_accum": grad_accum,
                  "device": args.device, "save_every": 0, "overlap_grad_reduce": args.overlap_grad_reduce,
                  "dist_backend": args.dist_backend},
        "output": {"dir": str(root / name), "progress": True},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _echo(stream: Any, log: list[str], name: str) -> None:
    """Keep the job's output and echo it as it comes, so a run cut short still shows how far each mode got;
    each echoed line starts with the seconds since the mode started (where its setup time goes)."""
    started = time.perf_counter()
    for line in stream:
        log.append(line)
        # Dynamo's recompile warnings: kept in the log; only their first lines are echoed
        if not line.startswith("W1") or any(k in line for k in ("recompile_limit", "function:", "last reason")):
            print(f"  [{name} {time.perf_counter() - started:5.0f}s] {line}", end="", flush=True)


def _run_mode(root: Path, args: argparse.Namespace, name: str, ranks: int, caps: list[float], grad_accum: int,
              tokenizer_dir: Path, split: list[int] | None = None, layer_split: bool = False) -> dict:
    cfg = _config(root, args, name, grad_accum, tokenizer_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           str(Path(__file__).resolve()), "--worker", str(cfg), "--worker-caps", ",".join(map(str, caps))]
    if args.num_layers:
        cmd += ["--num-layers", str(args.num_layers)]
    cmd += ["--trace-alloc"] * args.trace_alloc + ["--trace-native"] * args.trace_native
    cmd += ["--keep-compile-workers"] * args.keep_compile_workers + ["--one-gpu"] * args.one_gpu
    if layer_split:
        cmd += ["--worker-split", "--device", args.device]
    env = dict(os.environ, STREAMTUNE_DIST_TIMEOUT_S="900",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    if split:
        env["STREAMTUNE_RANK_MICRO_BATCHES"] = ",".join(map(str, split))
    metrics = root / name / "metrics.jsonl"
    baseline = used_bytes()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = HostSampler(functools.partial(job_pss_bytes, proc.pid))
    log: list[str] = []
    reader = threading.Thread(target=_echo, args=(proc.stdout, log, name), daemon=True)
    reader.start()
    while proc.poll() is None:
        steps = len(metrics.read_text().splitlines()) if metrics.is_file() else -1
        sampler.sample(run_phase(steps, (root / name / "adapter").exists()), used_bytes() - baseline)
        time.sleep(0.5)
    reader.join(timeout=5)
    wall_s = time.perf_counter() - started
    samples = sampler.samples
    result = {"mode": name, "ranks": ranks, "caps_gib": caps, "grad_accum": grad_accum, "split": split,
              "returncode": proc.returncode, "wall_s": wall_s, **sampler.summary()}
    if samples:  # when the peak came and what held it: the ranks, or the launcher and compile workers
        at = max(range(len(samples)), key=lambda i: samples[i][1])
        phase, used, rank_pss, other_pss = samples[at]
        rank_pss, other_pss = rank_pss or 0, other_pss or 0
        result["host_peak_sample"] = {"seconds": round(at * wall_s / len(samples), 1), "phase": phase,
                                      "bytes": used, "rank_pss_bytes": rank_pss, "other_pss_bytes": other_pss}
        print(f"[multi_gpu] {name}: host peak {used / 1e9:.1f} GB at about {result['host_peak_sample']['seconds']:.0f}"
              f" s (phase {phase}): ranks {rank_pss / 1e9:.1f} GB PSS, other processes {other_pss / 1e9:.1f} GB PSS",
              flush=True)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    timed = records[1:] or records
    if timed:
        result["tok_s"] = sum(r["tokens"] for r in timed) / sum(r["step_s"] for r in timed)
        result["step_s"] = sum(r["step_s"] for r in timed) / len(timed)
        result["gpu_peak_bytes_rank0"] = max(r["gpu_peak_bytes"] for r in timed)
        result["h2d_gbps_rank0"] = sum(r.get("h2d_gbps", 0.0) for r in timed) / len(timed)
        if "gpu_peak_bytes_per_device" in timed[0]:
            result["gpu_peak_bytes_per_device"] = [max(r["gpu_peak_bytes_per_device"][d] for r in timed)
                                                   for d in range(len(timed[0]["gpu_peak_bytes_per_device"]))]
    result["rank_times"] = _rank_times(log)
    if proc.returncode != 0:
        result["log_tail"] = "".join(log)[-3000:]
    print(f"[multi_gpu] {name}: rc={proc.returncode} tok/s={result.get('tok_s', 0):.0f} "
          f"host(train)={(result['host_train_bytes'] or 0) / GIB:.1f} GiB wall={wall_s:.0f} s", flush=True)
    return result


def _rank_times(log: list[str]) -> dict[str, dict[str, float]]:
    """Per rank, from the workers' ``[rank R step S]`` lines: median step and micro-batch seconds over the steps
    after the first (which compiles)."""
    import re
    import statistics

    found: dict[str, dict[str, list[float]]] = {}
    for line in log:
        match = re.search(r"\[rank (\d+) step (\d+)\] step ([\d.]+) s, micro-batches ([\d.na]+) s", line)
        if match and int(match.group(2)) > 1:
            times = found.setdefault(match.group(1), {"step_s": [], "micro_batches_s": []})
            times["step_s"].append(float(match.group(3)))
            times["micro_batches_s"].append(float(match.group(4)))
    return {rank: {key: statistics.median(values) for key, values in times.items() if values}
            for rank, times in sorted(found.items())}


def _predictions(args: argparse.Namespace, caps: list[float]) -> dict:
    from streamtune.plan.multi_gpu import plan_gpus
    from streamtune.plan.profiles import GPU_PROFILES

    config = args.model
    if args.num_layers:
        from streamtune.bench.common import bench_config

        config = bench_config(args.model, args.num_layers)
    h200 = GPU_PROFILES["h200"]
    plan = plan_gpus(config, [h200, h200], [int(c * GIB) for c in caps], micro_batches=args.micro_batches,
                     codec=args.codec, tokens=args.seq_len)
    return plan.to_dict()


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.worker:
        return worker(args)
    import torch

    from streamtune.data.tokenizer import build_tiny_tokenizer

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.micro_batches % 2:
        raise SystemExit("--micro-batches must be even (the same global batch on 1 and 2 GPUs)")
    if args.one_gpu and (args.dist_backend != "gloo" or set(modes) - {"dp1", "dp2"}):
        raise SystemExit("--one-gpu: only with --dist-backend gloo (NCCL refuses two ranks on one GPU) and dp1, dp2")
    two_gpu_modes = set(modes) & {"dp2", "caps", "split"} and not args.one_gpu
    if args.device == "cuda" and torch.cuda.device_count() < (2 if two_gpu_modes else 1):
        raise SystemExit(f"needs 2 GPUs for {modes}; torch sees {torch.cuda.device_count()}")
    caps = [float(c) for c in args.caps.split(",")]
    predictions = _predictions(args, caps)
    results = []
    with tempfile.TemporaryDirectory(prefix="multi_gpu-") as tmp:
        root = Path(tmp)
        tokenizer_dir = root / "tokenizer"
        build_tiny_tokenizer().save_pretrained(str(tokenizer_dir))
        cap = [args.cap_gib, args.cap_gib]
        for mode in modes:
            if mode == "dp1":
                results.append(_run_mode(root, args, mode, 1, cap[:1], args.micro_batches, tokenizer_dir))
            elif mode == "dp2":
                results.append(_run_mode(root, args, mode, 2, cap, args.micro_batches // 2, tokenizer_dir))
            elif mode == "caps":
                split = predictions["data_parallel"]["split"] if predictions["data_parallel"] else None
                results.append(_run_mode(root, args, mode, 2, caps, args.micro_batches // 2, tokenizer_dir, split))
            elif mode == "split":
                results.append(_run_mode(root, args, mode, 1, caps, args.micro_batches, tokenizer_dir,
                                         layer_split=True))
            else:
                raise SystemExit(f"--modes: unknown mode {mode!r}; known: dp1, dp2, caps, split")
            _save(args, results, predictions)  # after every mode: a run cut short keeps what it measured
    _report(args, results, predictions)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


# the report's "second rank adds" lines: (when, ((result key, what it measures), ...))
SECOND_RANK_LINES = (
    ("while training (max over steps 1-N)", (("host_train_bytes", "in use"), ("host_train_pss_bytes", "job PSS"))),
    ("after the warm-up steps (compile workers stopped)",
     (("host_steady_bytes", "in use"), ("host_steady_rank_pss_bytes", "PSS of the ranks"),
      ("host_steady_other_pss_bytes", "PSS of the other processes"))),
)


def _delta_gb(one: dict, two: dict, key: str) -> float | None:
    """``two[key] - one[key]`` in GB, None when either was not measured."""
    if one.get(key) is None or two.get(key) is None:
        return None
    return (two[key] - one[key]) / 1e9


def _report(args: argparse.Namespace, results: list[dict], predictions: dict) -> None:
    by_mode = {r["mode"]: r for r in results}
    print(f"\n{'mode':6} {'GPUs':>4} {'caps GiB':>9} {'tok/s':>8} {'step s':>7} {'host train GiB':>15} "
          f"{'job PSS GiB':>12} {'host peak GiB':>14}")
    for r in results:
        print(f"{r['mode']:6} {r['ranks']:>4} {'/'.join(f'{c:g}' for c in r['caps_gib']):>9} {r.get('tok_s', 0):>8.0f} "
              f"{r.get('step_s', 0):>7.2f} {(r['host_train_bytes'] or 0) / GIB:>15.1f} "
              f"{(r['host_train_pss_bytes'] or 0) / GIB:>12.1f} {(r['host_peak_bytes'] or 0) / GIB:>14.1f}"
              + (f"  GPU peaks GiB {'/'.join(f'{b / GIB:.1f}' for b in r['gpu_peak_bytes_per_device'])}"
                 if r.get("gpu_peak_bytes_per_device") else ""))
    if "dp1" in by_mode and "dp2" in by_mode and by_mode["dp1"].get("tok_s"):
        one, two = by_mode["dp1"], by_mode["dp2"]
        print(f"2-GPU speed-up: {two.get('tok_s', 0) / one['tok_s']:.2f}x (target >= 1.8x)"
              + (" -- not a speed-up: --one-gpu ran both ranks on one GPU" if args.one_gpu else ""))
        for label, measures in SECOND_RANK_LINES:
            deltas = [(_delta_gb(one, two, key), words) for key, words in measures]
            print(f"second rank adds, {label}: " + ", ".join(
                f"{'n/a' if d is None else f'{d:.2f}'} GB {words}" for d, words in deltas) + " (target < 2 GB)")
    for r in results:
        for rank, times in (r.get("rank_times") or {}).items():
            print(f"{r['mode']} rank {rank}: median step {times.get('step_s', float('nan')):.3f} s, its micro-batches "
                  f"{times.get('micro_batches_s', float('nan')):.3f} s (to the last kernel)")
    dp, ls = predictions["data_parallel"], predictions["layer_split"]
    print(f"caps {args.caps} GiB predicted (h200 profile): data parallel {dp['step_seconds'] if dp else float('nan'):.2f} s/step "
          f"(split {dp['split'] if dp else None}), layer split {ls['step_seconds'] if ls else float('nan'):.2f} s/step "
          f"(layer {ls['split_layer'] if ls else None}); planner picks {predictions['choice']}")
    if "caps" in by_mode and "split" in by_mode and by_mode["caps"].get("tok_s"):
        print(f"layer split against data parallel on the same pair: {by_mode['split'].get('tok_s', 0):.0f} against "
              f"{by_mode['caps']['tok_s']:.0f} tok/s ({by_mode['split'].get('tok_s', 0) / by_mode['caps']['tok_s']:.2f}x)")
    print(f"wrote {_save(args, results, predictions)}")


_STARTED = time.strftime("%Y%m%d-%H%M%S")


def _save(args: argparse.Namespace, results: list[dict], predictions: dict) -> Path:
    import torch

    gpu = torch.cuda.get_device_name(0).replace(" ", "_") if args.device == "cuda" else "cpu"
    out = Path(args.out) / f"multi_gpu-{gpu}-{_STARTED}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "predictions": predictions,
                               "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(main())
