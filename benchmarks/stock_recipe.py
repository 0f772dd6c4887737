"""The stock recipe on the GPU, with and without ``streamtune.compat.apply()``.

transformers Gemma4 (random weights) + accelerate device_map CPU offload + peft LoRA on every
attention/MLP projection + gradient checkpointing. For each model: a resident reference (when it
fits the card), the stock offloaded run, and the offloaded run after ``compat.apply()``. Prints a
table and writes JSON to benchmarks/results/.

    python benchmarks/stock_recipe.py                       # tiny-gemma4 and gemma4-26b-a4b
    python benchmarks/stock_recipe.py --models tiny-gemma4 --steps 6
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from streamtune import compat
from streamtune.compat.offload_lora import tiny_model
from streamtune.compat.recipe import run_recipe
from streamtune.models.build import build_preset

GIB = 1 << 30
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-gemma4,gemma4-26b-a4b")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="GPU cap for the offloaded runs")
    parser.add_argument("--headroom-gib", type=float, default=8.0,
                        help="part of the budget kept free of weights (activations, LoRA, optimizer)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--big-steps", type=int, default=3, help="steps for the 26B preset")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--big-seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda:0", help="cuda:0, or cpu for a smoke run of the tiny model")
    parser.add_argument("--no-reference", action="store_true", help="skip resident reference runs")
    parser.add_argument("--out", default=str(RESULTS / f"stock_recipe_{time.strftime('%Y%m%d-%H%M%S')}.json"))
    args = parser.parse_args(argv)
    if args.budget_gib <= args.headroom_gib:
        parser.error("--budget-gib must exceed --headroom-gib")
    return args


def builder(name: str):
    if name == "tiny-gemma4":
        return lambda: tiny_model(num_layers=4), torch.float32
    return lambda: build_preset(name, torch.bfloat16, seed=0), torch.bfloat16


def model_bytes(name: str) -> int:
    from streamtune.models.build import build_empty
    from streamtune.models.presets import preset_config

    dtype = torch.float32 if name.startswith("tiny") else torch.bfloat16
    model = build_empty(preset_config(name), dtype, device="meta")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def cap_gpu(budget_gib: float | None) -> None:
    if not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = 1.0 if budget_gib is None else min(1.0, budget_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)


def one_run(name: str, mode: str, args: argparse.Namespace, reference: dict | None) -> tuple[dict, dict]:
    build, _ = builder(name)
    big = not name.startswith("tiny")
    steps, seq_len = (args.big_steps, args.big_seq_len) if big else (args.steps, args.seq_len)
    kwargs = dict(num_steps=steps, seq_len=seq_len, rank=args.rank, lr=1e-3 if big else 1e-2)
    compat.revert()
    if mode == "resident":
        cap_gpu(None)
        result, grads = run_recipe(build, args.device, **kwargs)
    else:
        if mode == "offload+apply":
            compat.apply()
        cap_gpu(args.budget_gib)
        if big:
            max_memory = {0: int((args.budget_gib - args.headroom_gib) * GIB), "cpu": 1 << 50}
            result, grads = run_recipe(build, args.device, max_memory=max_memory, reference=reference, **kwargs)
        else:
            result, grads = run_recipe(build, args.device, offloaded=(1, 2), reference=reference, **kwargs)
    row = {"model": name, "run": mode, "applied": compat.applied(), **result.to_dict()}
    compat.revert()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row, grads


def runs_for(name: str, args: argparse.Namespace) -> list[dict]:
    rows, reference = [], None
    if args.device == "cpu":
        import psutil

        total = psutil.virtual_memory().available
    else:
        total = torch.cuda.get_device_properties(0).total_memory
    fits = model_bytes(name) * 1.3 < total
    if not args.no_reference and fits:
        row, reference = one_run(name, "resident", args, None)
        rows.append(row)
    elif not args.no_reference:
        rows.append({"model": name, "run": "resident", "ok": False,
                     "error": f"skipped: {model_bytes(name) / GIB:.1f} GiB of weights do not fit this card"})
    for mode in ("offload", "offload+apply"):
        row, _ = one_run(name, mode, args, reference)
        rows.append(row)
        print_table(rows[-1:], header=False)
    return rows


def print_table(rows: list[dict], header: bool = True) -> None:
    if header:
        print(f"{'model':<16} {'run':<14} {'ok':<3} {'offl':>4} {'trainable':>11} {'loss first->last':<18} "
              f"{'s/step':>7} {'peak GiB':>8} {'grad diff':>9}  error")
    for row in rows:
        losses = row.get("losses") or []
        loss = f"{losses[0]:.3f}->{losses[-1]:.3f}" if losses else "-"
        times = row.get("step_seconds") or []
        step = f"{statistics.median(times[1:] or times):.2f}" if times else "-"
        peak = f"{row['peak_gpu_bytes'] / GIB:.1f}" if row.get("peak_gpu_bytes") else "-"
        diff = row.get("max_grad_rel_diff")
        diff_text = "-" if diff is None else f"{diff:.1e}"
        print(f"{row['model']:<16} {row['run']:<14} {'yes' if row.get('ok') else 'no':<3} "
              f"{row.get('num_offloaded_layers', 0):>4} {row.get('num_trainable', 0):>11} {loss:<18} {step:>7} "
              f"{peak:>8} {diff_text:>9}  {row.get('error', '')[:90]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --models tiny-gemma4 for a smoke run", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.models != "tiny-gemma4":
        print("error: --device cpu runs only --models tiny-gemma4", file=sys.stderr)
        return 2
    print_table([], header=True)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows.extend(runs_for(name, args))
    print()
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    payload = {"versions": compat.versions(), "device": args.device, "gpu": gpu, "budget_gib": args.budget_gib,
               "args": vars(args), "rows": rows}
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
