"""Summing a GPU tensor over the ranks of one host through shared page-locked memory (gloo on GPUs).

Problem: ``train.dist_backend: gloo`` keeps NCCL (about 0.3 GB of host RAM per rank) out of the ranks, but gloo
sums over TCP even between processes of one host: the 26B preset's 74 MB of gradients took 33-38 ms on the H200
host (2.3 GB/s), plus the copies to and from the GPU, against about 3 ms for NCCL between two GPUs.
Solution: NCCL's shared-memory transport, without NCCL. Every rank copies its tensor into its own slot of a
buffer in ``/dev/shm`` that every local rank maps and page-locks (54 GB/s each way on PCIe 5), the ranks meet at a
gloo barrier (a few bytes), then each copies every slot back to its GPU and adds them in rank order, so every
rank computes the same sums bit for bit.

The tensor goes through in chunks of ``CHUNK_BYTES`` (16 MiB: the buffer holds 2 x ranks x 16 MiB, not a copy
of every rank's gradients), each chunk a "call" of this protocol. Two sets of slots alternate between calls.
Before a rank writes set ``k % 2`` (call ``k``) every rank must have finished reading it (call ``k - 2``): each
rank waits for its own reads of call ``k - 2`` (an event) before it enters call ``k - 1``'s barrier, and writes
set ``k % 2`` only after leaving that barrier.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path
from typing import Any

from streamtune.errors import InputError, StreamtuneError

NUM_SETS = 2
CHUNK_BYTES = 16 * 2**20
ENABLE_ENV = "STREAMTUNE_LOCAL_SUM"


def mode() -> str:
    """``STREAMTUNE_LOCAL_SUM``: ``auto`` (the default: GPU tensors), ``1`` (CPU tensors too) or ``0`` (never).

    On the CPU the shared-memory sum is slower than gloo's own (74 MB between two processes of a 2-core machine:
    77 against 64 ms, ``benchmarks/allreduce.py``), so ``auto`` leaves CPU tensors to gloo; ``1`` is for tests
    and A/B runs.

    Raises:
        InputError: another value.
    """
    value = os.environ.get(ENABLE_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise InputError(f"{ENABLE_ENV}={value!r}: use auto (GPU tensors), 1 (CPU tensors too) or 0 (never)")
    return value


def applies(ctx: Any, on_cuda: bool) -> bool:
    """Whether ``ctx`` sums tensors on CUDA (``on_cuda``) or on the CPU through shared memory: gloo, every rank on
    this host, and :func:`mode` allows it."""
    if ctx.backend != "gloo" or ctx.world_size <= 1 or ctx.world_size != ctx.local_world_size:
        return False
    return {"auto": on_cuda, "1": True, "0": False}[mode()]


class LocalSum:
    """Slots for chunks of tensors of one dtype in a shared buffer mapped by every local rank.

    Create it on every rank at once (:meth:`create` is a collective), then call :meth:`sum_` on every rank
    with tensors of that dtype and the same shapes, in the same order.
    """

    def __init__(self, ctx: Any, shared: Any, dtype: Any, chunk_numel: int) -> None:
        self.ctx = ctx
        self.dtype, self.chunk_numel = dtype, chunk_numel
        self._shared = shared  # the mapping: the page-lock lasts as long as this tensor
        flat = shared.view(dtype)
        self.slots = [[flat[(s * ctx.world_size + r) * chunk_numel:(s * ctx.world_size + r + 1) * chunk_numel]
                       for r in range(ctx.world_size)] for s in range(NUM_SETS)]
        self._reads_done: list[Any] = [None] * NUM_SETS
        self._calls = 0

    @classmethod
    def create(cls, ctx: Any, dtype: Any, chunk_bytes: int = CHUNK_BYTES, pin: bool = True) -> LocalSum:
        """Rank 0 makes the shared file, every rank maps (and page-locks) it, rank 0 unlinks it (a collective).

        Raises:
            InputError: the shared-memory directory has no room for the slots.
            StreamtuneError: another rank died or stalled, or CUDA refused to page-lock the mapping.
        """
        import torch

        from streamtune.distributed.shared_host import SHM_DIR_ENV, _reserve, shm_root
        from streamtune.offload.host import _register

        chunk_numel = chunk_bytes // torch.empty((), dtype=dtype).element_size()
        # whole pages: CUDA refuses to page-lock a mapping whose last page runs past the end of its file
        nbytes = -(-NUM_SETS * ctx.world_size * chunk_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        path = None
        if ctx.is_main:
            fd, path = tempfile.mkstemp(prefix="streamtune-sum-", dir=shm_root())
            os.close(fd)
            try:
                _reserve(Path(path), nbytes)
            except InputError as exc:
                raise InputError(f"train.dist_backend: gloo sums gradients through {nbytes / 1e6:.0f} MB of shared "
                                 f"memory: {exc}; or use train.dist_backend: nccl") from exc
        path = ctx.broadcast_object(path, "sharing the gradient-sum buffer's location")
        shared = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        if pin and not _register(shared):
            raise StreamtuneError(f"rank {ctx.rank}: cudaHostRegister refused the {nbytes / 1e6:.0f} MB shared "
                                  f"gradient-sum buffer {path}; point {SHM_DIR_ENV} at a tmpfs such as /dev/shm, "
                                  f"or use train.dist_backend: nccl")
        ctx.barrier("mapping the gradient-sum buffer")
        if ctx.is_main:
            Path(path).unlink()  # the mappings stay valid; the kernel frees the pages when the last rank exits
        return cls(ctx, shared, dtype, chunk_numel)

    def sum_(self, values: Any) -> Any:
        """Replace ``values`` (contiguous, on this rank's GPU) by its sum over the ranks; returns it.

        Raises:
            StreamtuneError: another rank died or stalled past the distributed timeout.
        """
        flat = values.view(-1)
        for start in range(0, flat.numel(), self.chunk_numel):
            self._sum_chunk(flat[start:start + self.chunk_numel])
        return values

    def _sum_chunk(self, chunk: Any) -> None:
        import torch

        index = self._calls % NUM_SETS
        self._calls += 1
        slots = [slot[:chunk.numel()] for slot in self.slots[index]]
        # D2H on the current stream, after the kernels that wrote ``chunk``; the host waits for it (and for this
        # rank's reads of the other set, queued by the previous call) before it tells the others
        slots[self.ctx.rank].copy_(chunk, non_blocking=True)
        if chunk.is_cuda:
            torch.cuda.current_stream(chunk.device).synchronize()
        previous = self._reads_done[1 - index]
        if previous is not None:
            previous.synchronize()
        self.ctx.barrier("gradient sum (shared memory)")
        # every slot of this set is written: sum them in rank order (the same sums on every rank)
        if not chunk.is_cuda:  # add straight from the shared slots
            torch.add(slots[0], slots[1], out=chunk)
            for rank in range(2, self.ctx.world_size):
                chunk.add_(slots[rank])
            return
        total = torch.empty_like(chunk)
        total.copy_(slots[0], non_blocking=True)
        for rank in range(1, self.ctx.world_size):
            chunk.copy_(slots[rank], non_blocking=True)
            total.add_(chunk)
        chunk.copy_(total)
        self._reads_done[index] = torch.cuda.Event()
        self._reads_done[index].record()
