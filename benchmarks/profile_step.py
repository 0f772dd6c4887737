"""Where a streamed step's time goes: the full preset on the engine under a GPU cap, profiled (issue 12).

For each token count: place the layers as the planner says under ``--cap-gib``, run warm-up steps, time
``--steps`` steps, then profile one step with ``torch.profiler`` and one more under
``torch.cuda.set_sync_debug_mode("warn")``. Printed per point:

- step seconds, and how long the Python side took to issue the step (``issue_s``: until ``opt.step()``
  returns, before the final synchronisation): ``issue_s`` close to ``step_s`` means the step waits on the
  CPU (launch overhead or host syncs), not on the GPU;
- GPU kernel time per category of notes/profile-categories.md, kernel launches, copy-stream time;
- the host syncs: each Python line that synchronised, with its count;
- the top kernels.

Then, with ``--resident``, the same for all layers resident on the uncapped GPU (the issue's "after" table).

    python benchmarks/profile_step.py --tokens 2048,8192 --kernels auto --resident --out $OUT
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from fast_step import CATEGORIES, categorise  # noqa: E402  (the categories of notes/profile-categories.md)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma4-26b-a4b")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--codec", default="int8")
    p.add_argument("--tokens", default="2048,8192")
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--kernels", default="auto", choices=["auto", "eager"])
    p.add_argument("--compile-layers", action="store_true", help="force train.compile_layers on (default: as train's "
                   "default, on for CUDA sm80+; `--without compile_layers` turns it off)")
    p.add_argument("--without", default="", help="fast pieces to turn off, KernelChoice fields, e.g. "
                   "fused_norm_act,lora_compute_dtype (what each costs or saves on the host and the GPU)")
    p.add_argument("--with", dest="with_", default="", help="pieces off by default to turn on, e.g. fast_experts")
    p.add_argument("--stages", default="", help="comma list of changes made one after another in this process, each "
                   "profiled at every --tokens after the plain run: +/-fast_experts, -fused_norm_act, "
                   "flex512=<set>, flex256=<set> (a flex_sweep.py option set); one model setup for all")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--loss-chunk-tokens", type=int, default=1024)
    p.add_argument("--resident", action="store_true", help="also profile every layer resident, uncapped")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="also run one step under cProfile and print its N costliest functions (host time)")
    p.add_argument("--out", default=None)
    return p.parse_args()


def sync_sites(step: Any) -> list[tuple[int, str]]:
    """Run ``step`` once with sync debug warnings on; the Python lines that synchronised, with counts."""
    sites = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return sorted(((n, s) for s, n in sites.items()), reverse=True)


def measure(step: Any, args: argparse.Namespace) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    times, issue = [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        issue.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {"step_s": sorted(times)[len(times) // 2], "issue_s": sorted(issue)[len(issue) // 2],
              "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30, "step_times_s": times,
              # each retry frees the allocator's cache after a device-wide sync (near the cap)
              "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    result.update(categorise(prof))
    result["top_ops"] = top_ops(prof, args.top)
    result["sync_sites"] = sync_sites(step)[:15]
    if args.host_profile:
        result["host_profile"] = host_profile(step, args.host_profile)
    return result


def top_ops(prof: Any, top: int) -> list[tuple[float, int, str, str]]:
    """The ATen ops whose own kernels took the most GPU time, per input shapes: ``(ms, calls, op, shapes)``
    (which op and tensor sizes a kernel of the top list belongs to)."""
    rows = []
    for evt in prof.key_averages(group_by_input_shape=True):
        device_us = getattr(evt, "self_device_time_total", 0) or 0
        if device_us > 0 and evt.key.startswith("aten::"):
            rows.append((round(device_us / 1e3, 2), evt.count, evt.key, str(evt.input_shapes)[:150]))
    return sorted(rows, reverse=True)[:top]


def host_profile(step: Any, top: int) -> list[tuple[float, float, int, str]]:
    """One step under cProfile: the ``top`` functions by own time, ``(own s, cumulative s, calls, where)``;
    printed as it goes, sorted by own time (where the host's issue time goes)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    step()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats
    rows = sorted(((tt, ct, nc, f"{Path(f).name}:{line}({fn})") for (f, line, fn), (_, nc, tt, ct, _) in stats.items()),
                  reverse=True)[:top]
    total_s = sum(tt for _, _, tt, _, _ in stats.values())
    print(f"[host profile] {total_s:.3f} s own time in all; own s / cumulative s / calls:")
    for tt, ct, nc, where in rows:
        print(f"    {tt:7.3f} {ct:7.3f} {nc:7d}  {where}")
    return rows


def apply_stage(model: Any, kernels: Any, stage: str) -> Any:
    """One ``--stages`` change on the live model; returns the new KernelChoice.

    Raises:
        SystemExit: a stage this script cannot apply.
    """
    import dataclasses

    if stage.startswith(("flex512=", "flex256=")):
        from flex_sweep import OPTION_SETS

        from streamtune.kernels.attention import use_flex_attention

        limit, name = int(stage[4:7]), stage.split("=", 1)[1]
        kernels = dataclasses.replace(kernels, flex_options={**kernels.flex_options, limit: dict(OPTION_SETS[name])})
        use_flex_attention(model, kernels)  # new kernel options: the compiled FlexAttention recompiles
        return kernels
    if stage == "+fast_experts":
        from streamtune.kernels.experts import use_fast_experts

        use_fast_experts(model, kernels.expert_lora or "loop")
    elif stage == "-fast_experts":
        from streamtune.kernels.experts import restore_stock_experts

        restore_stock_experts(model)
    elif stage == "-fused_norm_act":
        from streamtune.kernels.fused import restore_stock_norms_and_activation

        restore_stock_norms_and_activation(model)
    else:
        # +compile_layers cannot come after placement (kernels.regional.compile_layers says why): --compile-layers
        raise SystemExit(f"--stages: cannot apply {stage!r} (compiled layers: --compile-layers, a run of its own)")
    return dataclasses.replace(kernels, **{stage[1:]: stage[0] == "+"})


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """The preset with LoRA and the fast pieces, on the engine under the cap: what every point profiles."""
    import dataclasses

    from streamtune.bench.common import GIB, attach_lora, bench_config, cap_gpu_memory
    from streamtune.bench.variants import _adamw
    from streamtune.devices import detect_link_profile
    from streamtune.kernels import apply_kernels, select_for_device
    from streamtune.models.adapters import adapter_for
    from streamtune.models.build import LazyPreset
    from streamtune.offload import StreamEngine

    config = bench_config(args.model, args.num_layers)
    lazy = LazyPreset(config, torch.bfloat16)
    model = attach_lora(lazy.model, args.lora_rank)
    kernels = select_for_device(args.kernels, torch.device("cuda"), torch.bfloat16, args.compile_layers or None)
    switches = {name.strip(): False for name in args.without.split(",") if name.strip()}
    switches.update({name.strip(): True for name in args.with_.split(",") if name.strip()})
    kernels = dataclasses.replace(kernels, **switches)
    args.compile_layers = kernels.compile_layers  # the results file's name says whether layers were compiled
    applied = apply_kernels(model, kernels)
    budget = int(args.cap_gib * GIB)
    cap_gpu_memory(budget)
    engine = StreamEngine(model, "cuda", streamed=list(range(config.num_hidden_layers)), codec=args.codec,
                          load_tensor=lazy.load_tensor)
    return {"config": config, "adapter": adapter_for(config), "model": model, "kernels": kernels, "applied": applied,
            "budget": budget, "engine": engine, "opt": _adamw(model), "link": detect_link_profile(torch.device("cuda"))}


def profile_point(args: argparse.Namespace, run: dict[str, Any], tokens: int, resident: bool, stage: str) -> dict:
    """Place as the planner says at ``tokens`` (unless ``resident``), then :func:`measure` one point."""
    from streamtune.bench.common import random_batch
    from streamtune.bench.variants import _our_step
    from streamtune.plan import make_plan

    engine = run["engine"]
    plan = make_plan(run["config"], codec=args.codec, tokens=tokens, lora_rank=args.lora_rank, lora_targets=None,
                     gpu_budget_bytes=run["budget"], link=run["link"], loss_chunk_tokens=args.loss_chunk_tokens,
                     suggest=False, kernels=args.kernels)
    if not resident:
        engine.set_streamed(plan.streamed_indices)
    engine.step_metrics()
    batch = random_batch(tokens, run["config"].vocab_size, "cuda")

    def step() -> Any:
        return _our_step(run["model"], run["adapter"], batch, run["opt"], args.loss_chunk_tokens, run["kernels"])

    return {"tokens": tokens, "resident": resident, "stage": stage or "plain", "kernels": args.kernels,
            "codec": args.codec, "num_streamed": len(engine.streamed), "predicted_step_s": plan.step_seconds,
            "predicted_peak_gib": plan.gpu_peak_bytes / 2**30,
            "predicted_tensor_peak_gib": plan.tensor_peak_bytes / 2**30, **measure(step, args),
            "transfer": engine.step_metrics()}


def main() -> int:
    args = _args()
    args.started = time.strftime("%Y%m%d-%H%M%S")
    from streamtune.bench.common import cap_gpu_memory
    from streamtune.kernels.counters import CALLS

    run = setup(args)
    points = []
    stages = [""] + [st.strip() for st in args.stages.split(",") if st.strip()]
    for resident in ([False, True] if args.resident else [False]):
        if resident:
            cap_gpu_memory(None)
            run["engine"].set_streamed([])
        for stage in stages:
            if stage:
                run["kernels"] = apply_stage(run["model"], run["kernels"], stage)
            for tokens in [int(t) for t in args.tokens.split(",")]:
                point = profile_point(args, run, tokens, resident, stage)
                points.append(point)
                save(args, run["applied"], points)
                brief = {k: v for k, v in point.items() if k not in ("top", "top_ops", "host_profile")}
                print(f"[profile] {json.dumps(brief)}", flush=True)
                for ms, count, name in point["top"][:args.top]:
                    print(f"    {ms:8.1f} ms  x{count:<5d} {name}")
                print("  by op and input shapes:")
                for ms, count, op, shapes in point["top_ops"]:
                    print(f"    {ms:8.1f} ms  x{count:<5d} {op} {shapes}")
    print(f"kernel counters: {dict(CALLS)}")
    print(f"dynamo: {dynamo_summary()}")
    print(table(points, run["applied"]))
    return 0


def dynamo_summary() -> dict[str, Any]:
    """Graphs Dynamo compiled, recompiles and graph breaks in this process (regional compile's health)."""
    from torch._dynamo.utils import counters

    return {"stats": dict(counters["stats"]), "recompiles": sum(counters["recompiles"].values()),
            "graph_breaks": {reason[:120]: n for reason, n in counters["graph_break"].items()}}


def save(args: argparse.Namespace, applied: dict, points: list[dict]) -> None:
    """Write the points so far (after every point: a run cut short keeps what it measured)."""
    if not args.out:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    mode = args.kernels + ("-compiled" if args.compile_layers else "") + "".join(
        f"-no_{name.strip()}" for name in args.without.split(",") if name.strip()) + "".join(
        f"-with_{name.strip()}" for name in args.with_.split(",") if name.strip()) + ("-stages" if args.stages else "")
    (out / f"profile_step-{gpu}-{mode}-{args.started}.json").write_text(json.dumps(
        {"args": vars(args), "applied": applied, "torch": torch.__version__, "points": points}, indent=1))
    return 0


def table(points: list[dict], applied: dict) -> str:
    cats = [c for c, _ in CATEGORIES] + ["elementwise/other"]
    head = ["point"] + [f"{p['tokens']}{' res' if p['resident'] else ''} {p.get('stage', '')}" for p in points]
    rows = [head, ["step s"] + [f"{p['step_s']:.3f}" for p in points],
            ["issue s (CPU)"] + [f"{p['issue_s']:.3f}" for p in points],
            ["predicted s"] + [f"{p['predicted_step_s']:.3f}" for p in points],
            ["peak GiB"] + [f"{p['gpu_peak_gib']:.2f}" for p in points],
            ["predicted peak"] + [f"{p['predicted_peak_gib']:.2f}" for p in points],
            ["streamed"] + [str(p["num_streamed"]) for p in points]]
    rows += [[f"{c} ms"] + [f"{p['category_ms'].get(c, 0):.1f}" for p in points] for c in cats]
    rows += [["kernel ms"] + [f"{p['kernel_ms']:.1f}" for p in points],
             ["launches"] + [str(p["launches"]) for p in points],
             ["host syncs"] + [str(sum(n for n, _ in p["sync_sites"])) for p in points],
             ["allocator retries"] + [str(p.get("alloc_retries", "-")) for p in points]]
    lines = [f"kernels: {applied}"] + ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
