"""Plain-text table of a :class:`~streamtune.plan.planner.Plan` (``streamtune plan`` without ``--json``)."""

from __future__ import annotations

from streamtune.plan.planner import Plan, gib

_GPU_LABELS = {
    "embeddings_head_norm": "embeddings, LM head, final norm, buffers (bf16)",
    "resident_layers": "resident decoder layers ({codec})",
    "decode_workspace": "bf16 decode workspace (one, shared)",
    "ring": "ring: {slots} slot(s) for streamed layers",
    "lora_state": "LoRA params + grads + AdamW (fp32, {lora:,} params)",
    "activations_boundaries": "activations: checkpointed layer inputs",
    "activations_recompute": "activations: worst layer's recompute",
    "activations_loss": "activations: chunked loss (fp32 logits)",
    "activations_masks": "activations: attention masks",
    "allocator_slack": "allocator slack (5 %)",
    "cuda_context": "CUDA context",
}
_HOST_LABELS = {
    "pinned_weights": "pinned decoder-layer weights ({codec})",
    "staging": "loading staging (largest tensor group)",
    "runtime": "process runtime (python, torch, CUDA)",
    "compile_workers": "compile workers (first steps; not with staging)",
}


def param_count(num_params: int) -> str:
    """``25.23 B``, ``6.74 M`` or ``395,520``: a parameter count in a unit that shows it (tiny models included)."""
    if num_params >= 10**9:
        return f"{num_params / 1e9:.2f} B"
    if num_params >= 10**6:
        return f"{num_params / 1e6:.2f} M"
    return f"{num_params:,}"


def ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    if not indices:
        return "none"
    parts, start, prev = [], indices[0], indices[0]
    for i in list(indices[1:]) + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def _groups_table(plan: Plan) -> list[str]:
    lines = [f"  {'tensor group':<16}{'params':>16}{'bf16':>14}{plan.codec:>14}  placement"]
    for row in plan.groups:
        where = row["placement"]
        if where == "mixed":
            where = f"{row['resident_layers']} resident, {row['streamed_layers']} streamed layers"
        lines.append(f"  {row['group']:<16}{row['params']:>16,}{gib(row['bf16_bytes']):>14}"
                     f"{gib(row['bytes']):>14}  {where}")
    return lines


def format_table(plan: Plan, shortfall: bool = True) -> str:
    """The plan as a readable multi-line table (ending with the shortfall when it does not fit)."""
    fmt = {"codec": plan.codec, "slots": plan.ring_slots, "lora": plan.lora_trainable_params}
    t = plan.timing
    lines = [
        f"plan: {plan.model_name} ({param_count(plan.total_params)} params), codec {plan.codec}, "
        f"{plan.tokens} tokens/micro-batch, LoRA r={plan.lora_rank}, gradient checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'}, stream={plan.stream}",
        f"link: {plan.link.gpu_name} ({plan.link.source}): H2D {plan.link.h2d_gbps:.1f} GB/s, "
        f"bf16 matmul {plan.link.matmul_tflops:.0f} TFLOP/s, HBM {plan.link.hbm_gbps:.0f} GB/s",
        "",
        *_groups_table(plan),
        "",
        f"  decoder layers: {len(plan.layers)}; resident: {ranges(plan.resident_indices)}; "
        f"streamed ({len(plan.streamed_indices)}): {ranges(plan.streamed_indices)}",
        "",
        f"  GPU memory{'':<44}{'bytes':>14}",
    ]
    for key, value in plan.gpu_bytes.items():
        lines.append(f"    {_GPU_LABELS.get(key, key).format(**fmt):<52}{gib(value):>14}")
    verdict = "fits" if plan.fits_gpu else "DOES NOT FIT"
    lines.append(f"    {'GPU peak / budget':<52}{gib(plan.gpu_peak_bytes):>14} / {gib(plan.gpu_budget_bytes)}  {verdict}")
    lines += ["", "  host memory"]
    for key, value in plan.host_bytes.items():
        lines.append(f"    {_HOST_LABELS.get(key, key).format(**fmt):<52}{gib(value):>14}")
    budget = gib(plan.host_budget_bytes) if plan.host_budget_bytes is not None else "unchecked"
    verdict = "fits" if plan.fits_host else "DOES NOT FIT"
    lines.append(f"    {'host peak / budget':<52}{gib(plan.host_peak_bytes):>14} / {budget}  {verdict}")
    lines += [
        "",
        f"  step: forward GPU {t['compute_forward_seconds']:.3f} s, host {t.get('compute_cpu_forward_seconds', 0):.3f} s,"
        f" transfer {t['transfer_forward_seconds']:.3f} s; backward GPU {t['compute_backward_seconds']:.3f} s,"
        f" host {t.get('compute_cpu_backward_seconds', 0):.3f} s, transfer {t['transfer_backward_seconds']:.3f} s"
        f" (each pass takes the longest)",
        f"  predicted step {plan.step_seconds:.3f} s, {plan.tokens_per_second:,.0f} tokens/s, "
        f"limited by {plan.limited_by}",
    ]
    if shortfall and not plan.fits:
        lines += ["", plan.shortfall_text()]
    return "\n".join(lines)
