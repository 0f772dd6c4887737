"""Packing encoded parts into one flat uint8 buffer at aligned offsets, and viewing them back.

This mirrors what the offload engine does with a decoder layer: every part of every tensor sits at a
``PART_ALIGN_BYTES``-aligned byte offset of one buffer, and decoding reads byte-range views of it.
"""

from __future__ import annotations

import torch

from streamtune.quant.base import PartSpec

PART_ALIGN_BYTES = 256


def align_up(nbytes: int, align_bytes: int = PART_ALIGN_BYTES) -> int:
    """``nbytes`` rounded up to a multiple of ``align_bytes``."""
    return -(-nbytes // align_bytes) * align_bytes


def place_parts(
    specs: list[PartSpec], start_bytes: int = 0, align_bytes: int = PART_ALIGN_BYTES
) -> tuple[list[tuple[PartSpec, int]], int]:
    """Byte offsets for ``specs`` laid out one after another from ``start_bytes``, each aligned.

    Returns:
        ``([(spec, offset_bytes), ...], end_bytes)`` where ``end_bytes`` is the first free byte.

    Raises:
        ValueError: ``align_bytes`` is not positive.
    """
    if align_bytes <= 0:
        raise ValueError(f"align_bytes must be > 0, got {align_bytes}")
    placed, offset = [], start_bytes
    for spec in specs:
        offset = align_up(offset, align_bytes)
        placed.append((spec, offset))
        offset += spec.nbytes
    return placed, offset


def pack_parts(parts: dict[str, torch.Tensor], placed: list[tuple[PartSpec, int]], buf: torch.Tensor) -> None:
    """Copy each part's bytes into the uint8 ``buf`` at its offset.

    Raises:
        ValueError: ``buf`` is not a 1-D uint8 tensor, is too small, or a part does not match its spec.
    """
    _check_buffer(buf, placed)
    for spec, offset in placed:
        part = parts[spec.name]
        if part.dtype != spec.dtype or tuple(part.shape) != spec.shape:
            raise ValueError(f"part {spec.name!r} is {part.dtype} {tuple(part.shape)}, spec {spec}")
        buf[offset : offset + spec.nbytes].copy_(part.contiguous().view(-1).view(torch.uint8))


def part_views(buf: torch.Tensor, placed: list[tuple[PartSpec, int]]) -> dict[str, torch.Tensor]:
    """Views of ``buf`` (no copy) shaped and typed as the parts: ``buf[off:off+n].view(dtype).view(shape)``.

    Raises:
        ValueError: ``buf`` is not a 1-D uint8 tensor or is too small.
    """
    _check_buffer(buf, placed)
    return {
        spec.name: buf[offset : offset + spec.nbytes].view(spec.dtype).view(spec.shape) for spec, offset in placed
    }


def _check_buffer(buf: torch.Tensor, placed: list[tuple[PartSpec, int]]) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"buffer must be a 1-D uint8 tensor, got {buf.dtype} {tuple(buf.shape)}")
    end = max((offset + spec.nbytes for spec, offset in placed), default=0)
    if buf.numel() < end:
        raise ValueError(f"buffer holds {buf.numel()} bytes, the parts need {end}")
