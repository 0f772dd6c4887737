"""Fused Triton NF4 decode: unpack nibble, look up level, scale by block absmax, store; one pass.

Importing this module imports Triton (an ImportError when it is missing); ``streamtune.quant.nf4``
imports it only on demand and falls back to its torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamtune.quant.tiles import MAX_TENSORS, NF4_ELEMENTS_PER_PROGRAM
from streamtune.quant.triton_tables import table_entry

ELEMENTS_PER_PROGRAM = NF4_ELEMENTS_PER_PROGRAM
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


@triton.jit
def _nf4_decode_many_kernel(q_ptr, absmax_q_ptr, f32_ptr, levels_ptr, out_ptr, table_ptr, num_tensors,
                            BLOCK: tl.constexpr, MAX_T: tl.constexpr):
    """Double-quantized NF4: table rows ``[q byte, absmax code byte, scale, offset (float32 elements of f32_ptr),
    out element, numel, first program]``; one program decodes ``BLOCK`` elements of one tensor."""
    pid = tl.program_id(0).to(tl.int64)
    entry = table_entry(table_ptr, num_tensors, pid, 7, MAX_T)  # every access below is masked by its size
    q_off, code_off, scale_off = tl.load(entry), tl.load(entry + 1), tl.load(entry + 2)
    offset_off, out_off, numel, first = tl.load(entry + 3), tl.load(entry + 4), tl.load(entry + 5), tl.load(entry + 6)
    offsets = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    mask = (offsets >= 0) & (offsets < numel)
    packed = tl.load(q_ptr + q_off + offsets // 2, mask=mask, other=0).to(tl.int32)
    shift = 4 - (offsets % 2).to(tl.int32) * 4
    level = tl.load(levels_ptr + ((packed >> shift) & 15))
    block = offsets // 64
    code = tl.load(absmax_q_ptr + code_off + block, mask=mask, other=0).to(tl.float32)
    group = block // 256
    scale = tl.load(f32_ptr + scale_off + group, mask=mask, other=0.0)
    log_offset = tl.load(f32_ptr + offset_off + group, mask=mask, other=0.0)
    absmax = tl.where(code > 0, tl.exp2(log_offset + (code - 1.0) * scale), 0.0)
    tl.store(out_ptr + out_off + offsets, (level * absmax).to(out_ptr.dtype.element_ty), mask=mask)


def nf4_decode_many(q_bytes: torch.Tensor, f32: torch.Tensor, levels: torch.Tensor, out: torch.Tensor,
                    table: torch.Tensor, total_programs: int) -> None:
    """Decode several double-quantized NF4 tensors of one buffer in one launch.

    Args:
        q_bytes: the uint8 buffer holding every tensor's packed indices and absmax codes.
        f32: a float32 view of the same buffer (the groups' log2 scales and offsets).
        levels: the 16 NF4 levels, float32, on the device.
        out: the output buffer (one dtype) holding every decoded tensor.
        table: int64 ``[tensors, 7]`` on the device (see the kernel), checked by the caller against the buffers.
        total_programs: the sum of ``streamtune.quant.tiles.nf4_programs`` over the tensors.
    """
    _nf4_decode_many_kernel[(total_programs,)](q_bytes, q_bytes, f32, levels, out, table, table.shape[0],
                                               BLOCK=ELEMENTS_PER_PROGRAM, MAX_T=MAX_TENSORS, num_warps=NUM_WARPS)
