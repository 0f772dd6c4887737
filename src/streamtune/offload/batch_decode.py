"""One decode launch per bind of an int8 layer, instead of one per tensor.

Problem: binding a layer decoded each int8 tensor through the codec's ``decode``: its argument checks, views and a
Triton launch cost about 150 us of host time per tensor. The 26B int8 step at 2048 tokens is host-bound, and on
the H200 it spent 81 ms of its 415 ms there: 530 decodes in 60 binds (host profile,
``benchmarks/results/profile_step-NVIDIA_H200-auto-compiled-20261130-185216.json``).

Solution: for each (layer, buffer, workspace) the engine keeps its bind views; with them it now keeps a table of
the layer's int8 tensors (offsets, rows, columns; checked against the buffers' sizes) on the GPU, and a bind is
one launch of a kernel that decodes them all (``streamtune.quant.int8_triton.int8_decode_many``). The first
batched decode of a process is compared with the per-tensor decode of its two smallest tensors; a mismatch, or
a kernel that fails, turns batching off for the rest of the process with a warning, and the per-tensor decode
serves every bind as before.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from streamtune.kernels.counters import count
from streamtune.quant.int8_tiles import MAX_TENSORS, num_tiles

_STATE: dict[str, Any] = {"disabled": None, "checked": False}


@dataclass
class LayerDecode:
    """One launch's arguments: the bind-view positions it decodes and the kernel's buffers and table."""

    positions: list[int]
    q_bytes: torch.Tensor
    scales: torch.Tensor
    out: torch.Tensor
    table: torch.Tensor
    total_tiles: int


def disabled_reason() -> str | None:
    """Why batched decoding is off in this process (None: it is on)."""
    return _STATE["disabled"]


def reset() -> None:
    """Forget a failure and the first-use check (tests)."""
    _STATE.update(disabled=None, checked=False)


def _table_row(entry: Any, slot: torch.Tensor, workspace: torch.Tensor) -> list[int] | None:
    """``[q offset, scale offset, out offset, rows, cols]`` in elements of their views; None if not aligned or
    not inside the buffers."""
    parts = {p.name: p for p in entry.parts}
    q, scale = parts.get("q"), parts.get("scale")
    itemsize = entry.dtype.itemsize
    numel = q.nbytes if q is not None else 0
    cols = entry.shape[-1] if entry.shape else 1
    if q is None or scale is None or numel == 0 or cols == 0 or scale.offset_bytes % 4 \
            or entry.decoded_offset_bytes % itemsize:
        return None
    rows = numel // cols
    inside = (q.offset_bytes + numel <= slot.numel() and scale.offset_bytes + 4 * rows <= slot.numel()
              and entry.decoded_offset_bytes + numel * itemsize <= workspace.numel())
    return [q.offset_bytes, scale.offset_bytes // 4, entry.decoded_offset_bytes // itemsize, rows, cols] \
        if inside else None


def plan_layer_decode(entries: list[tuple[Any, dict, Any]], slot: torch.Tensor,
                      workspace: torch.Tensor | None) -> LayerDecode | None:
    """The batched decode of the int8 tensors among bind-view ``entries`` (``(tensor, parts, out)``), or None
    where it does not apply (not CUDA, no Triton, fewer than two such tensors, batching turned off)."""
    if workspace is None or slot.device.type != "cuda" or _STATE["disabled"] is not None:
        return None
    try:
        return build_layer_decode(entries, slot, workspace)
    except (RuntimeError, ValueError) as exc:  # e.g. a buffer whose address does not allow a float32 view
        _disable(f"{type(exc).__name__}: {exc}")
        return None


def build_layer_decode(entries: list[tuple[Any, dict, Any]], slot: torch.Tensor,
                       workspace: torch.Tensor) -> LayerDecode | None:
    """:func:`plan_layer_decode` on any device (tests run the kernel in Triton's CPU interpreter)."""
    picked = [(i, e) for i, (e, _, out) in enumerate(entries) if out is not None and e.codec.name == "int8"]
    if len(picked) < 2:
        return None
    dtype = Counter(e.dtype for _, e in picked).most_common(1)[0][0]
    positions, rows, first_tile = [], [], 0
    for i, entry in picked:
        row = _table_row(entry, slot, workspace) if entry.dtype == dtype else None
        if row is None or len(rows) == MAX_TENSORS:
            continue
        positions.append(i)
        rows.append(row + [first_tile])
        first_tile += num_tiles(row[3], row[4])
    if len(rows) < 2:
        return None
    # a blocking copy from pageable memory: the table is on the GPU before any kernel can read it
    table = torch.tensor(rows, dtype=torch.int64).to(slot.device)
    usable = workspace.numel() // dtype.itemsize * dtype.itemsize
    return LayerDecode(positions, slot.view(torch.int8), slot[: slot.numel() // 4 * 4].view(torch.float32),
                       workspace[:usable].view(dtype), table, first_tile)


def run_layer_decode(plan: LayerDecode, entries: list[tuple[Any, dict, Any]]) -> bool:
    """Launch ``plan`` on the current stream; True when its tensors are decoded (False: decode them one by one).

    The first launch in a process is checked against the per-tensor decode (one device sync, once).
    """
    if _STATE["disabled"] is not None:
        return False
    try:
        from streamtune.quant.int8_triton import int8_decode_many

        int8_decode_many(plan.q_bytes, plan.scales, plan.out, plan.table, plan.total_tiles)
        count("batched_int8_decode")
    except Exception as exc:  # Triton compile and launch errors have no common base class
        _disable(f"{type(exc).__name__}: {exc}")
        return False
    if not _STATE["checked"]:
        mismatch = _first_mismatch(plan, entries)
        if mismatch is not None:
            _disable(f"tensor {mismatch!r} differs from its per-tensor decode")
            return False
        _STATE["checked"] = True
    return True


def _first_mismatch(plan: LayerDecode, entries: list[tuple[Any, dict, Any]]) -> str | None:
    """The name of a tensor the launch decoded differently from the codec, among the two smallest it decoded
    (small: the check allocates their per-tensor decode, and may run near a GPU cap)."""
    by_size = sorted(plan.positions, key=lambda position: entries[position][0].decoded_nbytes)
    for position in by_size[:2]:
        entry, parts, out = entries[position]
        expected = entry.codec.decode(parts, entry.shape, entry.dtype)
        if not torch.equal(expected, out):
            return entry.name
    return None


def _disable(reason: str) -> None:
    _STATE["disabled"] = reason
    warnings.warn(f"streamtune: the batched int8 decode is off for this process ({reason[:300]}); layers are "
                  "decoded tensor by tensor", RuntimeWarning, stacklevel=3)
