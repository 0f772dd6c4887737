"""The start-of-run summary printed (stderr) before the first step: data, steps, LoRA, placement."""

from __future__ import annotations

import sys
from typing import Any

GiB = 2**30


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _count(value: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return str(value)


def data_lines(cfg: Any, stats: Any) -> list[str]:
    """What the data amounts to, and what truncation cut."""
    kind = "packed sequences" if stats.pack else "sequences (one sample each)"
    loss = "response-only loss" if stats.response_only else "loss on all tokens"
    lines = [f"data: {_n(stats.num_samples)} records ({stats.format}, {loss}) -> {_n(stats.rows_per_epoch)} {kind} "
             f"of up to {stats.seq_len} tokens per epoch; {_n(stats.num_tokens)} tokens, "
             f"{_n(stats.num_trained_tokens)} with loss, packing efficiency {stats.packing_efficiency:.0%}"]
    if stats.num_truncated:
        examples = getattr(stats, "truncated_examples", None) or []
        first = f" (first: {', '.join(examples)})" if examples else ""
        lines.append(f"truncated: {_n(stats.num_truncated)} of {_n(stats.num_samples)} samples are longer than "
                     f"data.seq_len={stats.seq_len}; {_n(getattr(stats, 'num_truncated_tokens', 0))} tokens cut{first}; "
                     f"raise data.seq_len to keep them")
    if stats.num_eval_samples:
        line = f"eval: {_n(stats.num_eval_samples)} records, {_n(stats.num_eval_tokens)} tokens"
        if stats.num_eval_truncated:
            line += (f"; {_n(stats.num_eval_truncated)} longer than data.seq_len "
                     f"({_n(getattr(stats, 'num_eval_truncated_tokens', 0))} tokens cut)")
        lines.append(line)
    return lines


def steps_line(cfg: Any, stats: Any, start_step: int, world_size: int = 1) -> str:
    """Steps, sequences per step over all ``world_size`` data-parallel ranks, and the epochs they amount to."""
    t = cfg.train
    per_step = t.batch_size * t.grad_accum * world_size
    sequences = t.max_steps * per_step
    epochs = sequences / max(1, stats.rows_per_epoch)
    ranks = f" x {world_size} ranks" if world_size > 1 else ""
    line = (f"steps: {_n(t.max_steps)} x {per_step} sequences (train.batch_size {t.batch_size} x train.grad_accum "
            f"{t.grad_accum}{ranks}) = {_n(sequences)} sequences = {epochs:.2f} epochs")
    if start_step:
        line += f"; resuming after step {start_step}"
    return line


def lora_line(cfg: Any, model: Any) -> str:
    """Trainable parameters per LoRA target and in total."""
    from streamtune.lora.targets import trainable_by_target

    per_target = trainable_by_target(model)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    parts = [f"{name} {e['layers']} layers x {_n(e['per_layer'])} = {_n(e['params'])}" if e["per_layer"]
             else f"{name} {e['layers']} layers (sizes differ) = {_n(e['params'])}" for name, e in per_target.items()]
    share = f" ({total / max(1, total + frozen):.2%} of {_count(total + frozen)} params)"
    return f"LoRA r={cfg.lora.rank}: " + "; ".join(parts) + f"; total {_n(total)} trainable{share}"


def placement_line(placement: Any, plan: Any) -> str | None:
    """Resident and streamed decoder layers, codec, memory; the plan's predictions when there is one."""
    if placement is None:
        return None
    d = placement.describe()
    streamed, resident = list(d.get("streamed_layers", [])), list(d.get("resident_layers", []))
    line = (f"placement: {len(resident)} resident, {len(streamed)} streamed decoder layers (codec {d.get('codec')}"
            + (f", ring {d.get('ring_slots')} slots, prefetch {d.get('prefetch')}" if streamed else "") + ")")
    if streamed:
        line += f"; streamed: {_ranges(streamed)}; host {_bytes(d.get('host_bytes', 0))} pinned"
    if plan is not None:
        peak = sum(plan.gpu_bytes.values())
        line += (f"; plan: GPU peak {_bytes(peak)} of {_bytes(plan.gpu_budget_bytes)}, "
                 f"{plan.timing.get('step_seconds', 0.0):.2f} s per micro-batch")
    return line


_PIECES = (("flex_attention", "FlexAttention"), ("fused_linear_ce", "fused loss"),
           ("lora_compute_dtype", "LoRA in the compute dtype"), ("fused_norm_act", "fused norms and activations"),
           ("fast_experts", "routed experts"))


def kernels_line(kernels: Any, applied: dict[str, Any] | None = None) -> str | None:
    """``train.kernels``: the fast pieces this device runs, and the compile the first step waits for."""
    if kernels is None:
        return None
    d = kernels.describe()
    if d["mode"] == "eager":
        return "kernels: eager (the stock HF/PEFT path)"
    pieces = [label for key, label in _PIECES if d.get(key)]
    if d.get("flex_attention") and d.get("wide_attention_min_tokens"):
        from streamtune.kernels.select import WIDE_HEAD_DIM

        pieces.insert(1, f"heads wider than {WIDE_HEAD_DIM} as chunked GEMMs from {d['wide_attention_min_tokens']} "
                         "tokens")
    line = f"kernels: auto ({', '.join(pieces) or 'none of the fast pieces applies on this device'})"
    compiled = (applied or {}).get("compiled_layers", 0)
    if compiled:
        line += (f"; {compiled} decoder layers compiled (train.compile_layers): the first step also compiles their "
                 "graphs (28 s on an H200 with a warm compile cache), later steps reuse them")
    return line


def _bytes(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= GiB else f"{value / 2**20:.1f} MiB"


def _ranges(indices: list[int]) -> str:
    parts, start = [], None
    for i, value in enumerate(sorted(indices)):
        if start is None:
            start = prev = value
        elif value != prev + 1:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = value
        prev = value
        if i == len(indices) - 1:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)


def summary_lines(cfg: Any, stats: Any, model: Any, placement: Any = None, plan: Any = None,
                  start_step: int = 0, kernels: Any = None, kernels_applied: dict[str, Any] | None = None,
                  world_size: int = 1) -> list[str]:
    """Every line of the start-of-run summary (``world_size``: data-parallel ranks)."""
    lines = [*data_lines(cfg, stats), steps_line(cfg, stats, start_step, world_size), lora_line(cfg, model)]
    for line in (placement_line(placement, plan), kernels_line(kernels, kernels_applied)):
        if line:
            lines.append(line)
    return lines


def print_summary(cfg: Any, stats: Any, model: Any, placement: Any = None, plan: Any = None,
                  start_step: int = 0, file: Any = None, kernels: Any = None,
                  kernels_applied: dict[str, Any] | None = None, world_size: int = 1) -> None:
    """Print :func:`summary_lines` to stderr (or ``file``)."""
    out = file or sys.stderr
    for line in summary_lines(cfg, stats, model, placement, plan, start_step, kernels, kernels_applied, world_size):
        print(line, file=out)
    out.flush()
