"""Transfer codecs for frozen base weights: ``bf16`` (identity), ``int8`` (per row), ``nf4`` (block 64).

Quantize on the CPU at load time (vectorised, chunked, intra-op parallel); decode on the tensor's
device (CUDA in training, CPU in tests) from the parts, which may be byte-range views of one packed
layer buffer. Codec ``"nf4"`` double-quantizes its block absmaxes (4.127 bits per weight);
``"nf4-fp32absmax"`` keeps them in float32 (4.5 bits per weight).
"""

from __future__ import annotations

import math

import torch

from streamtune.quant.base import Codec, PartSpec
from streamtune.quant.codecs import Bf16Codec, Int8Codec
from streamtune.quant.nf4 import NF4_LEVELS, Nf4Codec
from streamtune.quant.packing import PART_ALIGN_BYTES, pack_parts, part_views, place_parts
from streamtune.quant.policy import should_compress

CODECS: dict[str, Codec] = {
    "bf16": Bf16Codec(),
    "int8": Int8Codec(),
    "nf4": Nf4Codec(double_quant=True, name="nf4"),
    "nf4-fp32absmax": Nf4Codec(double_quant=False, name="nf4-fp32absmax"),
}


def get_codec(name: str) -> Codec:
    """The codec registered under ``name``.

    Raises:
        ValueError: ``name`` is not a registered codec (the message lists the allowed ones).
    """
    codec = CODECS.get(name)
    if codec is None:
        raise ValueError(f"codec {name!r} is unknown; allowed: {', '.join(CODECS)}")
    return codec


def encoded_nbytes(codec: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of the encoded parts of a ``shape``/``dtype`` tensor (no alignment padding; no tensors).

    Raises:
        ValueError: unknown codec, non-floating dtype or invalid shape.
    """
    return get_codec(codec).nbytes(shape, dtype)


def bits_per_element(codec: str, shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Encoded bits per element of a ``shape``/``dtype`` tensor (0.0 for an empty tensor).

    Raises:
        ValueError: unknown codec, non-floating dtype or invalid shape.
    """
    numel = math.prod(shape)
    return 8.0 * encoded_nbytes(codec, shape, dtype) / numel if numel else 0.0


__all__ = [
    "CODECS",
    "NF4_LEVELS",
    "PART_ALIGN_BYTES",
    "Bf16Codec",
    "Codec",
    "Int8Codec",
    "Nf4Codec",
    "PartSpec",
    "bits_per_element",
    "encoded_nbytes",
    "get_codec",
    "pack_parts",
    "part_views",
    "place_parts",
    "should_compress",
]
