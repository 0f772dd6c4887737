"""Tile sizes of the int8 Triton decode kernels, importable without Triton (the batched decode's table needs them
on machines where the kernel never runs)."""

from __future__ import annotations

BLOCK_ROWS = 8
BLOCK_COLS = 512
# tensors one batched launch decodes at most (the kernel scans this many table rows)
MAX_TENSORS = 64


def num_tiles(num_rows: int, num_cols: int) -> int:
    """Tiles of one ``[rows, cols]`` tensor in the batched decode's launch grid."""
    return -(-num_rows // BLOCK_ROWS) * -(-num_cols // BLOCK_COLS)
