"""The ``nf4`` codec: block-wise 4-bit NormalFloat (QLoRA's NF4 levels), blocks of 64 elements.

The tensor is flattened and cut into blocks of ``BLOCK_NUMEL`` elements (the tail block is padded with
zeros). Each block stores its absmax; each element stores the 4-bit index of the NF4 level nearest to
``x / absmax``. Two indices share a byte, the even element in the high nibble.

Parts:
  - ``"q"``: uint8 ``[num_blocks * 32]``;
  - ``double_quant=False``: ``"absmax"`` float32 ``[num_blocks]``;
  - ``double_quant=True`` (the default, codec ``"nf4"``): the absmaxes are quantized to 8 bits in the
    log2 domain per group of ``DQ_GROUP_BLOCKS`` blocks: ``"absmax_q"`` uint8
    ``[num_groups * 256]`` (0 means absmax 0), ``"absmax_scale"`` and ``"absmax_offset"`` float32
    ``[num_groups]``, with ``absmax = 2 ** (offset + scale * (code - 1))``. A log-domain code keeps
    the *relative* error of every absmax below ``2 ** (scale / 2) - 1`` (0.3 % when a group's absmaxes
    span 4x), where a linear code would wipe out the small absmaxes of a group.

Element indices are chosen against the absmax the decoder will use (after double quantization), so
every decoded value is ``absmax * NF4_LEVELS[index]`` with ``index`` the level nearest to
``x / absmax``. Size: 4.5 bits per element without double quantization, 4.127 with it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from streamtune.quant.base import (
    Codec,
    PartSpec,
    TritonDecode,
    check_decode_backend,
    check_float_dtype,
    check_segment,
    decode_target,
    encode_target,
    normalize_shape,
)
from streamtune.quant.cpu_encode import (
    absmax_rows,
    inverse_or_zero,
    nearest_index,
    pack_nibbles,
    run_chunks,
    to_float32,
)

BLOCK_NUMEL = 64
DQ_GROUP_BLOCKS = 256
# 1 Mi elements, a whole number of DQ groups: fewer, longer NumPy calls per byte (on the H200 host,
# 8 threads: 1.45 GB/s against 0.61 GB/s with 4096 blocks)
ENCODE_CHUNK_BLOCKS = 16384
CPU_DECODE_CHUNK_BLOCKS = 1 << 14
CUDA_DECODE_CHUNK_BLOCKS = 1 << 16  # torch fallback: 4 Mi elements, ~24 MB of temporaries
MAX_ABSMAX_CODE = 255

# The 16 NF4 levels of QLoRA (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_MIDPOINTS = tuple((lo + hi) / 2 for lo, hi in zip(NF4_LEVELS[:-1], NF4_LEVELS[1:]))

_TABLE_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}
_TRITON = TritonDecode("streamtune.quant.nf4_triton", "nf4_decode_triton", "NF4")


def num_blocks(numel: int) -> int:
    """Number of 64-element blocks covering ``numel`` elements."""
    return -(-numel // BLOCK_NUMEL)


def num_dq_groups(numel: int) -> int:
    """Number of double-quantization groups (256 blocks each) covering ``numel`` elements."""
    return -(-num_blocks(numel) // DQ_GROUP_BLOCKS)


class Nf4Codec(Codec):
    """Block-wise NF4 (block 64), optionally with double-quantized (8-bit log2) absmaxes.

    Args:
        double_quant: store the block absmaxes as 8-bit log2 codes per 256 blocks instead of float32.
        name: registry name.
    """

    def __init__(self, double_quant: bool = True, name: str = "nf4"):
        self.double_quant = double_quant
        self.name = name

    def layout(self, shape, dtype) -> list[PartSpec]:
        """Parts ``"q"`` and ``"absmax"`` (or ``"absmax_q"``, ``"absmax_scale"``, ``"absmax_offset"``).

        Raises:
            ValueError: ``dtype`` is not floating or ``shape`` is invalid.
        """
        check_float_dtype(dtype)
        numel = math.prod(normalize_shape(shape))
        blocks = num_blocks(numel)
        specs = [PartSpec("q", torch.uint8, (blocks * BLOCK_NUMEL // 2,))]
        if not self.double_quant:
            return specs + [PartSpec("absmax", torch.float32, (blocks,))]
        groups = num_dq_groups(numel)
        return specs + [
            PartSpec("absmax_q", torch.uint8, (groups * DQ_GROUP_BLOCKS,)),
            PartSpec("absmax_scale", torch.float32, (groups,)),
            PartSpec("absmax_offset", torch.float32, (groups,)),
        ]

    def encode(self, tensor: torch.Tensor, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Quantize on the CPU in chunks of ``ENCODE_CHUNK_BLOCKS`` blocks, on a pool of threads.

        Peak extra memory is a few float32 chunk buffers per thread, whatever the tensor size. The
        parts are CPU tensors (a tensor on another device is copied to the CPU first).

        Raises:
            ValueError: the tensor's dtype is not floating, or ``out`` does not match the layout.
        """
        parts = encode_target(self, tensor, out)
        flat = tensor.detach().cpu().contiguous().view(-1)
        chunk_numel = ENCODE_CHUNK_BLOCKS * BLOCK_NUMEL
        chunks = [
            (flat[start : start + chunk_numel], start // BLOCK_NUMEL, parts)
            for start in range(0, flat.numel(), chunk_numel)
        ]
        run_chunks(self._encode_chunk, chunks)
        return parts

    def segment_numel(self, shape) -> int:
        """Whole double-quantization groups (16384 elements), or whole blocks without them."""
        return BLOCK_NUMEL * DQ_GROUP_BLOCKS if self.double_quant else BLOCK_NUMEL

    def encode_segment(self, flat, start, stop, shape, parts) -> None:
        """Quantize elements ``start:stop`` into their blocks (and groups) of ``parts``.

        Raises:
            ValueError: the range does not start (and end, unless at the tensor's end) on a group.
        """
        check_segment(self, normalize_shape(shape), start, stop)
        first_block, last_block = start // BLOCK_NUMEL, num_blocks(stop)
        out = {"q": parts["q"][first_block * BLOCK_NUMEL // 2:last_block * BLOCK_NUMEL // 2]}
        if self.double_quant:
            first_group, last_group = first_block // DQ_GROUP_BLOCKS, -(-last_block // DQ_GROUP_BLOCKS)
            out["absmax_q"] = parts["absmax_q"][first_group * DQ_GROUP_BLOCKS:last_group * DQ_GROUP_BLOCKS]
            out["absmax_scale"] = parts["absmax_scale"][first_group:last_group]
            out["absmax_offset"] = parts["absmax_offset"][first_group:last_group]
        else:
            out["absmax"] = parts["absmax"][first_block:last_block]
        self.encode(flat[start:stop], out=out)

    def _encode_chunk(self, chunk: torch.Tensor, first_block: int, parts: dict[str, torch.Tensor]) -> None:
        """Encode one chunk (a whole number of DQ groups, except at the tensor's end) into ``parts``."""
        blocks = num_blocks(chunk.numel())
        x32 = to_float32(chunk, blocks * BLOCK_NUMEL)
        x = x32.reshape(blocks, BLOCK_NUMEL)
        absmax = absmax_rows(x)
        if self.double_quant:
            absmax = _double_quantize_into(absmax, first_block, parts)
        else:
            parts["absmax"][first_block : first_block + blocks] = torch.from_numpy(absmax)
        np.multiply(x, inverse_or_zero(absmax, 1.0)[:, None], out=x)
        index = nearest_index(x32, NF4_MIDPOINTS)
        first_byte = first_block * BLOCK_NUMEL // 2
        pack_nibbles(index, parts["q"][first_byte : first_byte + blocks * BLOCK_NUMEL // 2].numpy())

    def decode(self, parts, shape, dtype, out=None, *, backend: str = "auto") -> torch.Tensor:
        """Look up ``absmax * NF4_LEVELS[index]`` for every element, written into ``out``.

        Args:
            parts: the parts (see the module docstring).
            shape: original shape.
            dtype: output dtype.
            out: output tensor (same shape/dtype, on the parts' device); allocated when None.
            backend: ``"triton"`` (fused kernel, one pass), ``"torch"`` (gather + multiply, chunked),
                or ``"auto"``: Triton on CUDA when it imports, torch otherwise.

        Raises:
            ValueError: the parts or ``out`` do not match, or ``backend`` is unknown.
        """
        check_decode_backend(backend)
        shape, out = decode_target(self, parts, shape, dtype, out)
        device = out.device
        if out.numel() == 0:
            return out
        with torch.no_grad():
            absmax = self.block_absmax(parts)[: num_blocks(out.numel())]
            if not (_TRITON.wanted(backend, device)
                    and _TRITON.run(backend, parts["q"], absmax, level_table(device), out.view(-1))):
                _decode_torch(parts["q"], absmax, out.view(-1))
        return out

    def block_absmax(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 absmax of every block, as the decoder uses it (double quantization undone)."""
        if not self.double_quant:
            return parts["absmax"]
        codes = parts["absmax_q"].view(-1, DQ_GROUP_BLOCKS)
        return dequantize_absmax(codes, parts["absmax_scale"], parts["absmax_offset"]).view(-1)


def _double_quantize_into(absmax: np.ndarray, first_block: int, parts: dict) -> np.ndarray:
    """Write the 8-bit log2 codes of ``absmax`` into ``parts``; return the absmax they decode to."""
    blocks = absmax.size
    groups = -(-blocks // DQ_GROUP_BLOCKS)
    padded = np.zeros(groups * DQ_GROUP_BLOCKS, dtype=np.float32)
    padded[:blocks] = absmax
    codes, scale, offset = quantize_absmax(padded.reshape(groups, DQ_GROUP_BLOCKS))
    first_group = first_block // DQ_GROUP_BLOCKS
    parts["absmax_q"].numpy()[first_group * DQ_GROUP_BLOCKS : (first_group + groups) * DQ_GROUP_BLOCKS] = codes.ravel()
    parts["absmax_scale"].numpy()[first_group : first_group + groups] = scale
    parts["absmax_offset"].numpy()[first_group : first_group + groups] = offset
    values = np.exp2(offset[:, None] + scale[:, None] * (codes.astype(np.float32) - np.float32(1)))
    return np.where(codes > 0, values, np.float32(0)).astype(np.float32).ravel()[:blocks]


def quantize_absmax(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit log2 codes of ``absmax`` [groups, 256] (float32, >= 0): ``(codes uint8, scale, offset)``.

    Code 0 stands for 0; codes 1..255 cover ``log2`` of the group's nonzero absmaxes evenly, so
    ``absmax ~= 2 ** (offset + scale * (code - 1))`` with a relative error below ``2 ** (scale / 2) - 1``.
    """
    positive = absmax > 0
    log2 = np.log2(np.where(positive, absmax, np.float32(1)))
    offset = np.where(positive, log2, np.float32(np.inf)).min(axis=1)
    top = np.where(positive, log2, np.float32(-np.inf)).max(axis=1)
    empty = ~positive.any(axis=1)
    offset[empty] = 0
    top[empty] = 0
    scale = ((top - offset) / np.float32(MAX_ABSMAX_CODE - 1)).astype(np.float32)
    safe_scale = np.where(scale > 0, scale, np.float32(1))
    steps = np.clip(np.rint((log2 - offset[:, None]) / safe_scale[:, None]), 0, MAX_ABSMAX_CODE - 1)
    codes = np.where(positive, steps + 1, 0).astype(np.uint8)
    return codes, scale, offset.astype(np.float32)


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Float32 absmax [groups, 256] of the 8-bit log2 ``codes`` (inverse of ``quantize_absmax``)."""
    steps = codes.to(torch.float32) - 1.0
    values = torch.exp2(torch.addcmul(offset.unsqueeze(1), steps, scale.unsqueeze(1)))
    return torch.where(codes > 0, values, torch.zeros_like(values))


def level_table(device: torch.device) -> torch.Tensor:
    """The 16 NF4 levels as float32 on ``device`` (cached)."""
    return _cached_table("levels", device)


def pair_table(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the two levels (high nibble, low nibble) a packed byte stands for (cached)."""
    return _cached_table("pairs", device)


def _cached_table(kind: str, device: torch.device) -> torch.Tensor:
    key = (kind, torch.device(device))
    table = _TABLE_CACHE.get(key)
    if table is None:
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
        if kind == "pairs":
            codes = torch.arange(256)
            levels = torch.stack([levels[codes >> 4], levels[codes & 15]], dim=1)
        table = levels.to(device)
        _TABLE_CACHE[key] = table
    return table


def triton_available() -> bool:
    """True when Triton imports and the NF4 kernel module loads."""
    try:
        import streamtune.quant.nf4_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _decode_torch(q: torch.Tensor, absmax: torch.Tensor, out_flat: torch.Tensor) -> None:
    """Gather-and-multiply decode, chunked so temporaries stay bounded (float32 + int32 per chunk)."""
    table = pair_table(q.device)
    numel = out_flat.numel()
    step = CUDA_DECODE_CHUNK_BLOCKS if q.device.type == "cuda" else CPU_DECODE_CHUNK_BLOCKS
    for first in range(0, absmax.numel(), step):
        last = min(first + step, absmax.numel())
        codes = q[first * BLOCK_NUMEL // 2 : last * BLOCK_NUMEL // 2].to(torch.int32)
        values = torch.index_select(table, 0, codes).view(last - first, BLOCK_NUMEL)
        start, stop = first * BLOCK_NUMEL, min(last * BLOCK_NUMEL, numel)
        scale = absmax[first:last].unsqueeze(1)
        if stop - start == values.numel():
            torch.mul(values, scale, out=out_flat[start:stop].view(last - first, BLOCK_NUMEL))
        else:
            out_flat[start:stop].copy_(values.mul_(scale).view(-1)[: stop - start])
