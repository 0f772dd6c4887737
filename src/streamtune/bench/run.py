"""``streamtune bench`` / ``benchmarks/stream_step.py``: one run, several variants, one table.

Each variant runs in a child process (a clean CUDA context and host heap each); the parent
measures the link once, collects the children's JSON, prints the table and writes
``benchmarks/results/stream_step-<gpu>-<codec>-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from streamtune.config import TrainConfig

DEFAULT_VARIANTS = "streamtune,accelerate,fsdp2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--link", action="store_true",
                        help="only measure pinned H2D, dequant and matmul speeds and cache them for `streamtune plan`")
    parser.add_argument("--model", default="gemma4-26b-a4b", help="preset to build with random weights")
    parser.add_argument("--tokens", default="512,2048,8192", help="comma-separated tokens per step (batch 1)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="streamtune (incl. resident), stock (the stock step with the whole bf16 model resident, "
                             "uncapped: needs a GPU that holds it), accelerate, fsdp2")
    parser.add_argument("--gpu-budget-gib", type=float, default=24.0, help="GPU cap for the capped variants")
    parser.add_argument("--codec", default="bf16", choices=["bf16", "int8", "nf4"])
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--ring-slots", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--loss-chunk-tokens", type=int, default=1024)
    parser.add_argument("--kernels", default="auto", choices=["auto", "eager"],
                        help="train.kernels of the streamtune and resident variants (auto: the fast path)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per length (after two warm-ups)")
    parser.add_argument("--gc-every-steps", type=_non_negative_int, default=TrainConfig.gc_every_steps,
                        help="train.gc_every_steps of the streamtune and resident variants (0: Python's automatic "
                             "garbage collection, inside the steps)")
    parser.add_argument("--baseline-steps", type=int, default=1, help="timed steps of the slow baselines")
    parser.add_argument("--accelerate-headroom-gib", type=float, default=8.0,
                        help="GPU memory the accelerate recipe leaves for activations (max_memory = cap - this)")
    parser.add_argument("--skip-resident", action="store_true", help="do not time the resident baseline")
    parser.add_argument("--num-layers", type=int, default=None, help="cut the model to N layers (smoke runs)")
    parser.add_argument("--out", default="benchmarks/results", help="directory of the JSON results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--link-json", default=None, help=argparse.SUPPRESS)


def _non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return value


def _link_profile(link: dict[str, Any]) -> Any:
    from streamtune.devices import PLANNER_MATMUL_FRACTION
    from streamtune.plan.profiles import profile_from_measurement

    return profile_from_measurement({**link, "matmul_tflops": link["matmul_tflops"] * PLANNER_MATMUL_FRACTION})


def run_child(args: argparse.Namespace) -> int:
    from streamtune.bench.variants import VARIANTS

    args.tokens = [int(t) for t in str(args.tokens).split(",")]
    args.link_profile = _link_profile(json.loads(args.link_json)) if args.link_json else None
    results = VARIANTS[args.child](args)
    Path(args.child_out).write_text(json.dumps([r.to_dict() for r in results]))
    return 0


def _child_argv(args: argparse.Namespace, variant: str, out: str, link: dict[str, Any]) -> list[str]:
    argv = [sys.executable, "-m", "streamtune.bench.run", "--child", variant, "--child-out", out,
            "--link-json", json.dumps(link)]
    for key in ("model", "tokens", "gpu_budget_gib", "codec", "lora_rank", "ring_slots", "prefetch",
                "loss_chunk_tokens", "kernels", "steps", "gc_every_steps", "baseline_steps", "accelerate_headroom_gib",
                "num_layers"):
        value = getattr(args, key)
        if value is not None:
            argv += ["--" + key.replace("_", "-"), str(value)]
    return argv + (["--skip-resident"] if args.skip_resident else [])


def run(args: argparse.Namespace) -> int:
    """Measure the link, run each variant in a child process, print and save the table."""
    import torch

    from streamtune.bench.common import measure_link
    from streamtune.errors import InputError

    if not torch.cuda.is_available():
        raise InputError("bench: needs a CUDA GPU (none visible); `streamtune plan --gpu NAME` predicts without one")
    check_variants(args, torch.cuda.get_device_properties(0).total_memory)
    link = measure_link()
    print(f"[bench] link: {json.dumps(link)}", flush=True)
    if args.link:
        from streamtune.devices import PLANNER_MATMUL_FRACTION
        from streamtune.plan import save_link_profile

        # cached as the planner uses it (the same scaling as the bench's own predictions)
        path = save_link_profile(link["h2d_gbps"], link["matmul_tflops"] * PLANNER_MATMUL_FRACTION,
                                 link["gpu_name"], link["dequant_gbps"], gpu_memory_bytes=link["gpu_memory_bytes"],
                                 decode_numel=link["decode_numel"])
        print(f"link profile saved to {path}")
        return 0
    results: list[dict[str, Any]] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"stream_step-{link['gpu_name'].replace(' ', '_')}-{args.codec}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"link": link, "args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
              "results": results, "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = tmp.name
        start = time.perf_counter()
        proc = subprocess.run(_child_argv(args, variant, out, link))
        print(f"[bench] {variant}: exit {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
        try:
            results += json.loads(Path(out).read_text())
        except (OSError, json.JSONDecodeError):
            results.append({"variant": variant, "tokens": None, "error": f"child exited {proc.returncode}"})
        # written after every variant, so a run cut short keeps what it measured
        (out_dir / name).write_text(json.dumps(report, indent=1))
    print(format_report(report), flush=True)
    print(f"results written to {out_dir / name}")
    return 0


# the stock variant holds the whole bf16 model on the GPU; the rest (LoRA, optimizer, activations) must fit beside
STOCK_MAX_WEIGHT_FRACTION = 0.85


def check_variants(args: argparse.Namespace, gpu_total_bytes: int) -> None:
    """Refuse unknown ``--variants`` and a ``stock`` variant whose bf16 model cannot sit on this GPU, before any
    weights are built.

    Raises:
        InputError: an unknown variant, or ``stock`` with a model larger than this GPU can hold.
    """
    from streamtune.bench.common import bench_config
    from streamtune.bench.variants import VARIANTS
    from streamtune.errors import InputError
    from streamtune.plan.sizing import build_meta_model

    known = tuple(VARIANTS)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in known]
    if unknown or not variants:
        raise InputError(f"bench --variants: unknown {', '.join(unknown) or '(none given)'}; allowed: "
                         f"{', '.join(known)}")
    if "stock" not in variants:
        return
    weight_bytes = 2 * sum(p.numel() for p in build_meta_model(bench_config(args.model, args.num_layers)).parameters())
    if weight_bytes > STOCK_MAX_WEIGHT_FRACTION * gpu_total_bytes:
        raise InputError(f"bench --variants stock: {args.model} in bf16 is {weight_bytes / 2**30:.1f} GiB and the "
                         f"stock step holds all of it on the GPU, which has {gpu_total_bytes / 2**30:.1f} GiB; leave "
                         f"stock out of --variants on this card (or cut the model with --num-layers)")


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(int(value), spec) if spec == "d" else format(value / scale, spec)


def format_report(report: dict[str, Any]) -> str:
    """The results table plus the ratios the targets are stated in."""
    gib = 1 << 30
    rows = [f"{'variant':<11} {'tokens':>6} {'step s':>7} {'tok/s':>8} {'peak GiB':>8} {'H2D GB/s':>8} "
            f"{'GB/step':>7} {'wait s':>6} {'pred s':>6} {'pred GiB':>8}  note"]
    for r in report["results"]:
        extra = r.get("extra") or {}
        rows.append(
            f"{r['variant']:<11} {_fmt(r.get('tokens'), 'd'):>6} {_fmt(r.get('step_s'), '.3f'):>7} "
            f"{_fmt(r.get('tok_s'), '.0f'):>8} {_fmt(r.get('gpu_peak_bytes'), '.2f', gib):>8} "
            f"{_fmt(r.get('h2d_gbps'), '.1f'):>8} {_fmt(r.get('h2d_bytes'), '.1f', 1e9):>7} "
            f"{_fmt(r.get('copy_wait_s'), '.3f'):>6} {_fmt(extra.get('predicted_step_s'), '.3f'):>6} "
            f"{_fmt(extra.get('predicted_gpu_peak_bytes'), '.2f', gib):>8}  "
            f"{r.get('error') or _note(extra)}")
    rows += _ratios(report)
    return "\n".join(rows)


def _note(extra: dict[str, Any]) -> str:
    """Streamed layers, the timed steps' spread, allocator retries (each one a device-wide sync) and, per step, the
    calls of the pieces that prove the fast path ran (wide-head attention, batched decodes)."""
    from streamtune.bench.common import WARMUP_STEPS

    parts = [f"streamed {extra['num_streamed']}"] if "num_streamed" in extra else []
    timed = extra.get("step_times_s", [])[WARMUP_STEPS:]
    if len(timed) > 1:
        parts.append(f"steps {min(timed):.3f}-{max(timed):.3f} s")
    if extra.get("alloc_retries"):
        parts.append(f"{extra['alloc_retries']} allocator retries")
    calls, steps = extra.get("kernel_calls") or {}, extra.get("counted_steps") or 0
    for key, label in (("wide_attention", "wide attention"), ("batched_int8_decode", "int8 decode launches"),
                       ("batched_nf4_decode", "nf4 decode launches")):
        if calls.get(key) and steps:
            parts.append(f"{label} {calls[key] / steps:.0f}/step")
    return ", ".join(parts)


def _ratios(report: dict[str, Any]) -> list[str]:
    """One line per streamtune token count: step time against its bound and the baselines' speed.

    The bound is max(resident step, streamed bytes / pinned H2D); a part that was not measured (resident
    skipped, nothing streamed, a variant that failed) is left out, and the line says so.
    """
    by = {(r["variant"], r.get("tokens")): r for r in report["results"]}
    h2d_bytes_per_s = (report.get("link") or {}).get("h2d_gbps", 0.0) * 1e9
    lines = []
    for (variant, tokens), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        if variant != "streamtune" or not r.get("step_s"):
            continue
        resident = (by.get(("resident", tokens)) or {}).get("step_s")
        copy_s = (r.get("h2d_bytes") or 0.0) / h2d_bytes_per_s if h2d_bytes_per_s > 0 else 0.0
        bound = max(resident or 0.0, copy_s)
        if resident:
            line = (f"{tokens:>6} tokens: streamtune/bound = {r['step_s'] / bound:.2f} (target <= 1.15; bound = "
                    f"max(resident {resident:.3f} s, streamed bytes / pinned H2D {copy_s:.3f} s))")
        elif bound > 0:  # the copy floor alone is no bound to hold a target to: the step may be compute-bound
            line = (f"{tokens:>6} tokens: streamtune/copy floor = {r['step_s'] / bound:.2f} (streamed bytes / pinned "
                    f"H2D {copy_s:.3f} s; resident not timed, so no bound)")
        else:
            line = f"{tokens:>6} tokens: streamtune {r['step_s']:.3f} s (no bound: nothing streamed, resident not timed)"
        for base in ("resident", "stock", "accelerate", "fsdp2"):
            other = (by.get((base, tokens)) or {}).get("tok_s")
            if other and r.get("tok_s"):
                line += f"; x{r['tok_s'] / other:.2f} {base}"
        line += _mfu(report, r, resident) + _prediction_errors(r)
        lines.append(line)
    return lines


def _prediction_errors(row: dict[str, Any]) -> str:
    """``; planner error: step +x %, tensor peak +y %`` (measured peak = max_memory_allocated)."""
    extra = row.get("extra") or {}
    parts = []
    if extra.get("predicted_step_s") and row.get("step_s"):
        parts.append(f"step {extra['predicted_step_s'] / row['step_s'] - 1:+.0%}")
    if extra.get("predicted_tensor_peak_bytes") and row.get("gpu_peak_bytes"):
        parts.append(f"tensor peak {extra['predicted_tensor_peak_bytes'] / row['gpu_peak_bytes'] - 1:+.0%}")
    return f"; planner error: {', '.join(parts)}" if parts else ""


def _mfu(report: dict[str, Any], row: dict[str, Any], resident_s: float | None) -> str:
    """``; MFU x % (resident y %)``: 6 N_active tokens / step time / the measured bf16 matmul peak."""
    active = (row.get("extra") or {}).get("active_params")
    peak_tflops = (report.get("link") or {}).get("matmul_tflops")
    if not active or not peak_tflops:
        return ""
    flops = 6.0 * active * row["tokens"]
    text = f"; MFU {flops / row['step_s'] / (peak_tflops * 1e12):.1%}"
    if resident_s:
        text += f" (resident {flops / resident_s / (peak_tflops * 1e12):.1%})"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamtune bench")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_child(args) if args.child else run(args)


if __name__ == "__main__":
    sys.exit(main())
