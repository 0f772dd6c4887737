"""Codec throughput benchmarks: encode on the CPU, decode on any device."""

from __future__ import annotations

import time

import torch

from streamtune.plan.profiles import DECODE_TIMING_NUMEL
from streamtune.quant import CODECS, get_codec

DEFAULT_DECODE_NUMEL = DECODE_TIMING_NUMEL
DEFAULT_ENCODE_NUMEL = 100 * (1 << 20)
# Problem: a decode's speed depends on its size (a 32 MB decode is bound by its launches, a layer's tensors are
# hundreds of MB), but encoding a layer-sized tensor on the CPU takes seconds. Solution: encode at most this
# many elements and stack copies of the parts on the device. Every codec stores a row-major tensor block after
# block (int8: rows; nf4: 64-element blocks in groups of 256), so k copies of a tensor stacked along its rows
# encode to k copies of each part, when the block groups divide this number.
MAX_ENCODED_NUMEL = 1 << 24


def benchmark_decode(device: str | torch.device = "cuda", numel: int = DEFAULT_DECODE_NUMEL, repeats: int = 5,
                     max_encoded_numel: int = MAX_ENCODED_NUMEL) -> dict:
    """Decode throughput per codec: GB/s of bf16 output written (best of ``repeats``).

    The input is a random bf16 matrix of about ``numel`` elements (rows of 4096), encoded on the CPU
    (a block of ``max_encoded_numel`` elements, its parts stacked to the full size on ``device`` when
    ``numel`` is a multiple of it), decoded into a preallocated output. The identity codec is timed as a
    copy into ``out``.

    Args:
        device: where to decode (``"cuda"``, ``"cpu"``).
        numel: elements of the test tensor.
        repeats: timed runs per codec (after one warm-up run).
        max_encoded_numel: elements encoded on the CPU at most (see ``MAX_ENCODED_NUMEL``).

    Returns:
        ``{codec_name: GB/s}``.

    Raises:
        ValueError: ``numel`` or ``repeats`` is not positive.
    """
    if numel <= 0 or repeats <= 0:
        raise ValueError(f"numel and repeats must be > 0, got numel={numel}, repeats={repeats}")
    device = torch.device(device)
    shape = _bench_shape(numel)
    copies = numel // max_encoded_numel if numel > max_encoded_numel and numel % max_encoded_numel == 0 else 1
    tensor = torch.randn((shape[0] // copies, shape[1]), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16, device=device)
    results = {}
    for name, codec in CODECS.items():
        parts = stacked_parts(codec.encode(tensor), copies, device)
        seconds = _best_time(codec, parts, shape, out, repeats)
        results[name] = out.numel() * out.element_size() / seconds / 1e9
    return results


def benchmark_encode(codec: str, numel: int = DEFAULT_ENCODE_NUMEL, repeats: int = 1) -> float:
    """CPU encode throughput of ``codec`` in GB/s of bf16 input (best of ``repeats``).

    Raises:
        ValueError: unknown codec, or ``numel``/``repeats`` not positive.
    """
    if numel <= 0 or repeats <= 0:
        raise ValueError(f"numel and repeats must be > 0, got numel={numel}, repeats={repeats}")
    resolved = get_codec(codec)
    tensor = torch.randn(_bench_shape(numel), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        resolved.encode(tensor)
        best = min(best, time.perf_counter() - start)
    return tensor.numel() * tensor.element_size() / best / 1e9


def stacked_parts(parts: dict[str, torch.Tensor], copies: int, device: str | torch.device = "cpu") -> dict:
    """The parts of ``copies`` copies of an encoded tensor stacked along its rows, on ``device``
    (valid when the codec's block groups divide the tensor; see ``MAX_ENCODED_NUMEL``)."""
    return {key: part.to(device).repeat(copies, *([1] * (part.dim() - 1))) for key, part in parts.items()}


def _bench_shape(numel: int) -> tuple[int, int]:
    cols = min(4096, numel)
    return (max(1, numel // cols), cols)


def _best_time(codec, parts: dict, shape: tuple[int, ...], out: torch.Tensor, repeats: int) -> float:
    codec.decode(parts, shape, out.dtype, out=out)
    best = float("inf")
    for _ in range(repeats):
        _sync(out.device)
        start = time.perf_counter()
        codec.decode(parts, shape, out.dtype, out=out)
        _sync(out.device)
        best = min(best, time.perf_counter() - start)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
