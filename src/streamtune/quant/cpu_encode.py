"""CPU encode kernels: NumPy on float32 chunks, run by a thread pool over chunks.

Why NumPy and a pool rather than torch's intra-op threads: on CPU, torch's comparison kernels are
about 10x slower than NumPy's (the NF4 index takes 15 compare passes), and small per-chunk torch ops
that each open an OpenMP parallel region stall when the cores are shared. NumPy ufuncs release the
GIL, so a pool of ``torch.get_num_threads()`` workers, each on its own chunk, runs in parallel with
no nested threading; peak extra memory is a few chunk buffers per worker, whatever the tensor size.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

INT8_MAX = 127
_SCRATCH = threading.local()
LONG_ROW_NUMEL = 256


MAX_WORKERS = 8


def num_workers(num_chunks: int) -> int:
    """Worker threads for ``num_chunks`` chunks: torch's intra-op thread count, at most ``MAX_WORKERS``.

    Problem: past a handful of threads the pool stops scaling (the GIL held between NumPy calls and
    the memory bus are shared): on the 16-core H200 host, nf4 encoded 1.45 GB/s with 8 threads and
    1.23 GB/s with 16, int8 2.54 and 1.29 GB/s. Solution: at most 8 workers.
    """
    return max(1, min(torch.get_num_threads(), num_chunks, MAX_WORKERS))


def run_chunks(function, chunk_args: list[tuple]) -> None:
    """Call ``function(*args)`` for every ``args`` in ``chunk_args`` on a pool of worker threads.

    Each worker takes every ``workers``-th chunk, so its scratch arrays are reused chunk after chunk.
    """
    workers = num_workers(len(chunk_args))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="streamtune-encode") as pool:
        futures = [pool.submit(_run_strided, function, chunk_args[first::workers]) for first in range(workers)]
        for future in futures:
            future.result()


def _run_strided(function, chunk_args: list[tuple]) -> None:
    try:
        for args in chunk_args:
            function(*args)
    finally:
        release_scratch()


def scratch(name: str, numel: int, dtype) -> np.ndarray:
    """A 1-D work array of ``numel`` elements, reused by the calling thread across chunks.

    Reuse matters: a fresh multi-megabyte array per chunk is a fresh ``mmap`` whose page faults
    serialize the worker threads on the kernel's memory-map lock.
    """
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buffer = buffers.get(name)
    if buffer is None or buffer.size < numel or buffer.dtype != dtype:
        buffer = buffers[name] = np.empty(numel, dtype=dtype)
    return buffer[:numel]


def release_scratch() -> None:
    """Drop the calling thread's work arrays."""
    _SCRATCH.buffers = {}


def to_float32(chunk: torch.Tensor, padded_numel: int | None = None) -> np.ndarray:
    """The values of the contiguous CPU tensor ``chunk`` as float32 (exact), in a scratch array.

    Args:
        chunk: 1-D or n-D contiguous CPU tensor.
        padded_numel: length of the result; elements past ``chunk.numel()`` are zero.
    """
    numel = chunk.numel()
    result = scratch("float32", padded_numel or numel, np.float32)
    if chunk.dtype == torch.bfloat16:
        bits = chunk.reshape(-1).view(torch.int16).numpy().view(np.uint16)
        widened = result[:numel].view(np.uint32)
        np.left_shift(bits, 16, out=widened, dtype=np.uint32)
    else:
        np.copyto(result[:numel], chunk.reshape(-1).numpy(), casting="same_kind")
    result[numel:] = 0
    return result


def absmax_rows(x32: np.ndarray) -> np.ndarray:
    """Largest ``|x|`` of every row of the 2-D float32 ``x32`` (NaN-free), float32.

    For short rows (NF4 blocks), clearing the sign bit and taking an integer max orders the values
    correctly and is about 2.5x faster than NumPy's float ``abs`` + ``max``; long rows use max/min.
    """
    if x32.shape[1] >= LONG_ROW_NUMEL:
        return np.maximum(x32.max(axis=1), -x32.min(axis=1))
    magnitude = np.bitwise_and(x32.view(np.int32), np.int32(0x7FFFFFFF))
    return magnitude.max(axis=1).view(np.float32)


def inverse_or_zero(absmax: np.ndarray, numerator: float) -> np.ndarray:
    """``numerator / absmax`` where ``absmax > 0``, else 0 (float32, no warnings)."""
    with np.errstate(divide="ignore"):
        inverse = np.float32(numerator) / absmax
    return np.where(absmax > 0, inverse, np.float32(0)).astype(np.float32)


def encode_int8_rows(rows: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize ``rows`` [n, k] into ``q`` [n, k] int8 and ``scale`` [n] float32 (CPU tensors)."""
    x32 = to_float32(rows).reshape(rows.shape)
    absmax = absmax_rows(x32)
    np.divide(absmax, np.float32(INT8_MAX), out=scale.numpy())
    np.multiply(x32, inverse_or_zero(absmax, INT8_MAX)[:, None], out=x32)
    np.rint(x32, out=x32)
    np.copyto(q.numpy(), x32, casting="unsafe")


def nearest_index(normalized: np.ndarray, midpoints: tuple[float, ...]) -> np.ndarray:
    """uint8 index of the nearest level for every element: the count of ``midpoints`` below it.

    Ties (a value exactly on a midpoint) go to the lower level.
    """
    index = scratch("index", normalized.size, np.uint8)
    above = scratch("above", normalized.size, np.bool_)
    index[:] = 0
    for midpoint in midpoints:
        np.greater(normalized, np.float32(midpoint), out=above)
        index += above.view(np.uint8)
    return index


def pack_nibbles(index: np.ndarray, out: np.ndarray) -> None:
    """Pack the uint8 indices (< 16) two per byte into ``out``: even element in the high nibble."""
    np.left_shift(index[0::2], 4, out=out)
    np.bitwise_or(out, index[1::2], out=out)
