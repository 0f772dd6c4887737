"""Codec throughput benchmarks: encode on the CPU, decode on any device."""

from __future__ import annotations

import time

import torch

from streamtune.quant import CODECS, get_codec

DEFAULT_DECODE_NUMEL = 1 << 28
DEFAULT_ENCODE_NUMEL = 100 * (1 << 20)


def benchmark_decode(device: str | torch.device = "cuda", numel: int = DEFAULT_DECODE_NUMEL, repeats: int = 5) -> dict:
    """Decode throughput per codec: GB/s of bf16 output written (best of ``repeats``).

    The input is a random bf16 matrix of about ``numel`` elements (rows of 4096), encoded on the CPU,
    moved to ``device``, decoded into a preallocated output. The identity codec is timed as a copy
    into ``out``.

    Args:
        device: where to decode (``"cuda"``, ``"cpu"``).
        numel: elements of the test tensor.
        repeats: timed runs per codec (after one warm-up run).

    Returns:
        ``{codec_name: GB/s}``.

    Raises:
        ValueError: ``numel`` or ``repeats`` is not positive.
    """
    if numel <= 0 or repeats <= 0:
        raise ValueError(f"numel and repeats must be > 0, got numel={numel}, repeats={repeats}")
    device = torch.device(device)
    shape = _bench_shape(numel)
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16, device=device)
    results = {}
    for name, codec in CODECS.items():
        parts = {key: part.to(device) for key, part in codec.encode(tensor).items()}
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
