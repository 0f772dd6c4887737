"""The table lookup the batched Triton decode kernels share (importing this module imports Triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def table_entry(table_ptr, num_tensors, pid, COLUMNS: tl.constexpr, MAX_T: tl.constexpr):
    """Pointer to the table row of the tensor that program ``pid`` decodes: the last row whose first program (the
    row's last column) is at or before ``pid``. Clamped to the table, so a caller that masks every access by that
    row's own sizes cannot touch memory outside its tensor."""
    index = tl.arange(0, MAX_T)
    starts = tl.load(table_ptr + index * COLUMNS + (COLUMNS - 1), mask=index < num_tensors, other=2**62)
    row = tl.sum((starts <= pid).to(tl.int32), axis=0) - 1
    row = tl.minimum(tl.maximum(row, 0), num_tensors - 1).to(tl.int64)
    return table_ptr + row * COLUMNS
