"""One decode launch per codec per bind of a layer, instead of one per tensor (int8 and double-quantized nf4).

Problem: binding a layer decoded each compressed tensor through its codec's ``decode``: argument checks, views
and a Triton launch (nf4: also six torch kernels for its absmaxes) cost about 150 us of host time per tensor.
The 26B int8 step at 2048 tokens is host-bound, and on the H200 it spent 81 ms of its 415 ms there: 530 decodes
in 60 binds (host profile, ``benchmarks/results/profile_step-NVIDIA_H200-auto-compiled-20261130-185216.json``).

Solution: for each (layer, buffer, workspace) the engine keeps its bind views; with them it now keeps a table
of the layer's int8 tensors and one of its nf4 tensors (offsets, sizes; checked against the buffers' sizes) on
the GPU, and a bind launches one kernel per table (``int8_decode_many``, ``nf4_decode_many``). The first
batched decode of each codec in a process is compared with the per-tensor decode of its two smallest tensors;
a mismatch, or a kernel that fails, turns that codec's batching off for the rest of the process with a
warning, and the per-tensor decode serves its binds as before.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from streamtune.kernels.counters import count
from streamtune.quant.nf4 import num_blocks, num_dq_groups
from streamtune.quant.tiles import MAX_TENSORS, nf4_programs, num_tiles

KINDS = ("int8", "nf4")
_STATE: dict[str, dict[str, Any]] = {kind: {"disabled": None, "checked": False} for kind in KINDS}


@dataclass
class LayerDecode:
    """One launch: the codec ``kind``, the bind-view positions it decodes, and the kernel's buffers and table."""

    kind: str
    positions: list[int]
    slot: torch.Tensor
    out: torch.Tensor
    table: torch.Tensor
    num_programs: int


def disabled_reason(kind: str = "int8") -> str | None:
    """Why batched decoding of ``kind`` is off in this process (None: it is on)."""
    return _STATE[kind]["disabled"]


def reset() -> None:
    """Forget failures and first-use checks (tests)."""
    for state in _STATE.values():
        state.update(disabled=None, checked=False)


def _kind(entry: Any) -> str | None:
    name = entry.codec.name
    if name == "int8":
        return "int8"
    return "nf4" if name == "nf4" and getattr(entry.codec, "double_quant", False) else None


def _int8_row(entry: Any, slot_bytes: int, workspace_bytes: int) -> tuple[list[int], int] | None:
    """``[q byte, scale float, out element, rows, cols]`` and its tiles; None if not aligned or not inside."""
    parts = {p.name: p for p in entry.parts}
    q, scale = parts.get("q"), parts.get("scale")
    numel, cols = (q.nbytes if q is not None else 0), (entry.shape[-1] if entry.shape else 1)
    if q is None or scale is None or numel == 0 or cols == 0 or scale.offset_bytes % 4 \
            or entry.decoded_offset_bytes % entry.dtype.itemsize:
        return None
    rows = numel // cols
    inside = (q.offset_bytes + numel <= slot_bytes and scale.offset_bytes + 4 * rows <= slot_bytes
              and entry.decoded_offset_bytes + numel * entry.dtype.itemsize <= workspace_bytes)
    row = [q.offset_bytes, scale.offset_bytes // 4, entry.decoded_offset_bytes // entry.dtype.itemsize, rows, cols]
    return (row, num_tiles(rows, cols)) if inside else None


def _nf4_row(entry: Any, slot_bytes: int, workspace_bytes: int) -> tuple[list[int], int] | None:
    """``[q byte, code byte, scale float, offset float, out element, numel]`` and its programs; None if not
    aligned or not inside the buffers."""
    parts = {p.name: p for p in entry.parts}
    q, codes = parts.get("q"), parts.get("absmax_q")
    scale, offset = parts.get("absmax_scale"), parts.get("absmax_offset")
    numel = int(torch.Size(entry.shape).numel())
    if None in (q, codes, scale, offset) or numel == 0 or scale.offset_bytes % 4 or offset.offset_bytes % 4 \
            or entry.decoded_offset_bytes % entry.dtype.itemsize:
        return None
    blocks, groups = num_blocks(numel), num_dq_groups(numel)
    inside = (q.offset_bytes + -(-numel // 2) <= min(slot_bytes, q.offset_bytes + q.nbytes)
              and codes.offset_bytes + blocks <= min(slot_bytes, codes.offset_bytes + codes.nbytes)
              and scale.offset_bytes + 4 * groups <= slot_bytes and offset.offset_bytes + 4 * groups <= slot_bytes
              and entry.decoded_offset_bytes + numel * entry.dtype.itemsize <= workspace_bytes)
    row = [q.offset_bytes, codes.offset_bytes, scale.offset_bytes // 4, offset.offset_bytes // 4,
           entry.decoded_offset_bytes // entry.dtype.itemsize, numel]
    return (row, nf4_programs(numel)) if inside else None


_ROWS = {"int8": _int8_row, "nf4": _nf4_row}


def plan_layer_decode(entries: list[tuple[Any, dict, Any]], slot: torch.Tensor,
                      workspace: torch.Tensor | None) -> list[LayerDecode]:
    """The batched decodes (one per codec) among bind-view ``entries`` (``(tensor, parts, out)``): none where they
    do not apply (not CUDA, fewer than two such tensors, batching of that codec turned off)."""
    if workspace is None or slot.device.type != "cuda":
        return []
    plans = []
    for kind in KINDS:
        if _STATE[kind]["disabled"] is not None:
            continue
        try:
            plan = build_layer_decode(entries, slot, workspace, kind)
        except (RuntimeError, ValueError) as exc:  # e.g. a buffer whose address does not allow a float32 view
            _disable(kind, f"{type(exc).__name__}: {exc}")
            continue
        if plan is not None:
            plans.append(plan)
    return plans


def build_layer_decode(entries: list[tuple[Any, dict, Any]], slot: torch.Tensor, workspace: torch.Tensor,
                       kind: str = "int8") -> LayerDecode | None:
    """One ``kind`` launch of :func:`plan_layer_decode` on any device (tests run the kernels in Triton's CPU
    interpreter); None with fewer than two such tensors."""
    picked = [(i, e) for i, (e, _, out) in enumerate(entries) if out is not None and _kind(e) == kind]
    if len(picked) < 2:
        return None
    dtype = Counter(e.dtype for _, e in picked).most_common(1)[0][0]
    positions, rows, first_program = [], [], 0
    for i, entry in picked:
        found = _ROWS[kind](entry, slot.numel(), workspace.numel()) if entry.dtype == dtype else None
        if found is None or len(rows) == MAX_TENSORS:
            continue
        positions.append(i)
        rows.append(found[0] + [first_program])
        first_program += found[1]
    if len(rows) < 2:
        return None
    # a blocking copy from pageable memory: the table is on the GPU before any kernel can read it
    table = torch.tensor(rows, dtype=torch.int64).to(slot.device)
    usable = workspace.numel() // dtype.itemsize * dtype.itemsize
    return LayerDecode(kind, positions, slot, workspace[:usable].view(dtype), table, first_program)


def _launch(plan: LayerDecode) -> None:
    float_view = plan.slot[: plan.slot.numel() // 4 * 4].view(torch.float32)
    if plan.kind == "int8":
        from streamtune.quant.int8_triton import int8_decode_many

        int8_decode_many(plan.slot.view(torch.int8), float_view, plan.out, plan.table, plan.num_programs)
    else:
        from streamtune.quant.nf4 import level_table
        from streamtune.quant.nf4_triton import nf4_decode_many

        nf4_decode_many(plan.slot, float_view, level_table(plan.slot.device), plan.out, plan.table,
                        plan.num_programs)


def run_layer_decode(plans: list[LayerDecode], entries: list[tuple[Any, dict, Any]]) -> set[int]:
    """Launch ``plans`` on the current stream; returns the bind-view positions they decoded (the others are left
    to the per-tensor decode). The first launch of each codec in a process is checked (one device sync, once)."""
    decoded: set[int] = set()
    for plan in plans:
        state = _STATE[plan.kind]
        if state["disabled"] is not None:
            continue
        try:
            _launch(plan)
            count(f"batched_{plan.kind}_decode")
        except Exception as exc:  # import, Triton compile and launch errors have no common base class
            _disable(plan.kind, f"{type(exc).__name__}: {exc}")
            continue
        if not state["checked"]:
            mismatch = _first_mismatch(plan, entries)
            if mismatch is not None:
                _disable(plan.kind, f"tensor {mismatch!r} differs from its per-tensor decode")
                continue
            state["checked"] = True
        decoded.update(plan.positions)
    return decoded


def _first_mismatch(plan: LayerDecode, entries: list[tuple[Any, dict, Any]]) -> str | None:
    """The name of a tensor the launch decoded differently from the codec, among the two smallest it decoded
    (small: the check allocates their per-tensor decode, and may run near a GPU cap). int8 must be bit-equal;
    nf4 within a rounding of the output dtype (the kernels may round ``exp2`` of the absmax differently)."""
    by_size = sorted(plan.positions, key=lambda position: entries[position][0].decoded_nbytes)
    for position in by_size[:2]:
        entry, parts, out = entries[position]
        expected = entry.codec.decode(parts, entry.shape, entry.dtype)
        same = torch.equal(expected, out) if plan.kind == "int8" else \
            torch.allclose(expected.float(), out.float(), rtol=2 * torch.finfo(entry.dtype).eps, atol=0.0)
        if not same:
            return entry.name
    return None


def _disable(kind: str, reason: str) -> None:
    _STATE[kind]["disabled"] = reason
    warnings.warn(f"streamtune: the batched {kind} decode is off for this process ({reason[:300]}); layers are "
                  "decoded tensor by tensor", RuntimeWarning, stacklevel=3)
