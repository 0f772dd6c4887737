"""Fused Triton NF4 decode: unpack nibble, look up level, scale by block absmax, store; one pass.

Importing this module imports Triton (an ImportError when it is missing); ``streamtune.quant.nf4``
imports it only on demand and falls back to its torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ELEMENTS_PER_PROGRAM = 2048
NUM_WARPS = 4


@triton.jit
def _nf4_decode_kernel(q_ptr, absmax_ptr, levels_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    packed = tl.load(q_ptr + offsets // 2, mask=mask, other=0).to(tl.int32)
    shift = 4 - (offsets % 2).to(tl.int32) * 4
    index = (packed >> shift) & 15
    level = tl.load(levels_ptr + index)
    absmax = tl.load(absmax_ptr + offsets // 64, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, (level * absmax).to(out_ptr.dtype.element_ty), mask=mask)


def nf4_decode_triton(q: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, out_flat: torch.Tensor) -> None:
    """Decode packed NF4 ``q`` with float32 block ``absmax`` into the flat contiguous ``out_flat``.

    Args:
        q: uint8 packed indices (even element in the high nibble), at least ``ceil(numel / 2)`` bytes.
        absmax: float32 absmax per 64-element block.
        levels: the 16 NF4 levels, float32, on the same device.
        out_flat: 1-D contiguous output (bf16, fp16, fp32 or fp64).
    """
    numel = out_flat.numel()
    grid = (triton.cdiv(numel, ELEMENTS_PER_PROGRAM),)
    _nf4_decode_kernel[grid](q, absmax, levels, out_flat, numel, BLOCK=ELEMENTS_PER_PROGRAM, num_warps=NUM_WARPS)
