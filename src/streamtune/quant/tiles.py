"""Launch geometry of the Triton decode kernels, importable without Triton (the batched decode builds its tables
on machines where the kernels never run)."""

from __future__ import annotations

# int8: [rows, columns] tiles
BLOCK_ROWS = 8
BLOCK_COLS = 512
# nf4: elements per program
NF4_ELEMENTS_PER_PROGRAM = 2048
# tensors one batched launch decodes at most (the kernels scan this many table rows)
MAX_TENSORS = 64


def num_tiles(num_rows: int, num_cols: int) -> int:
    """Programs of one int8 ``[rows, cols]`` tensor in the batched decode's launch grid."""
    return -(-num_rows // BLOCK_ROWS) * -(-num_cols // BLOCK_COLS)


def nf4_programs(numel: int) -> int:
    """Programs of one nf4 tensor of ``numel`` elements in the batched decode's launch grid."""
    return -(-numel // NF4_ELEMENTS_PER_PROGRAM)
