"""The gradient all-reduce of data parallel, overlapped with the step's last backward (``train.overlap_grad_reduce``).

Problem: :meth:`DistContext.all_reduce_grads` sums every LoRA gradient in one flat all-reduce after the last
micro-batch's backward, and the step waits for it: 74 MB of fp32 gradients for the 26B preset (about 3 ms
between two H200s over NVLink, more between consumer cards over PCIe without peer access).
Solution: DDP's buckets. The parameters are cut into buckets of about ``bucket_bytes`` in reverse order (the
backward reaches the last layers first). During the step's last backward on this rank, a post-accumulate-grad
hook counts each bucket's gradients; once all are in, that bucket's all-reduce starts asynchronously while the
backward goes on. Buckets start strictly in index order, so every rank issues the same collectives in the same
order whatever its timing. A bucket whose gradients do not all arrive (a rank with no micro-batch this step, a
parameter the step did not use) starts in :meth:`OverlappedGradReduce.finish`, in order, with zeros for the
missing gradients. The sums are the same as the flat all-reduce's: each rank's loss is already divided by the
global number of loss tokens.
"""

from __future__ import annotations

import sys
from typing import Any

from streamtune.distributed.context import write_grads

DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def make_buckets(params: list[Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[int]]:
    """Indices into ``params``, last parameter first, cut into runs of at most ``bucket_bytes`` (a larger
    parameter is a bucket of its own) that share one dtype and device (one flat tensor each)."""
    buckets: list[list[int]] = []
    size = 0
    for index in reversed(range(len(params))):
        param = params[index]
        nbytes = param.numel() * param.element_size()
        same_kind = buckets and (params[buckets[-1][0]].dtype, params[buckets[-1][0]].device) == (
            param.dtype, param.device)
        if not same_kind or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(index)
        size += nbytes
    return buckets


def make_grad_reduce(ctx: Any, params: list[Any], overlap: bool) -> OverlappedGradReduce | None:
    """The overlapped reduction when ``overlap`` (``train.overlap_grad_reduce``) and ranks are active, else None
    (then the trainer calls ``ctx.all_reduce_grads`` after the backward). Rank 0 says which it is on stderr."""
    if not (overlap and ctx.active):
        return None
    reduce = OverlappedGradReduce(ctx, params)
    if ctx.is_main:
        num_buckets = len(reduce.buckets)
        print(f"gradient all-reduce: overlapped with each step's last backward, {num_buckets} "
              f"bucket{'s' * (num_buckets != 1)} of up to {DEFAULT_BUCKET_BYTES >> 20} MiB", file=sys.stderr,
              flush=True)
    return reduce


class OverlappedGradReduce:
    """Sum the gradients of ``params`` over the ranks of ``ctx``, bucket by bucket during the last backward.

    Use: :meth:`arm` just before this rank's last backward of the step (not at all when it has no micro-batch),
    then :meth:`finish` after it, where the single-shot path calls ``ctx.all_reduce_grads(params)``.
    """

    def __init__(self, ctx: Any, params: list[Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.ctx = ctx
        self.params = list(params)
        self.buckets = make_buckets(self.params, bucket_bytes)
        self._bucket_of = {id(self.params[i]): b for b, bucket in enumerate(self.buckets) for i in bucket}
        self._pending: list[int] = []
        self._next = 0
        self._hooks: list[Any] = []
        self._in_flight: list[tuple[list[int], Any, Any]] = []

    def arm(self) -> None:
        """Start each bucket's all-reduce as soon as the coming backward has accumulated all its gradients."""
        self.disarm()
        self._pending = [len(bucket) for bucket in self.buckets]
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def disarm(self) -> None:
        """Remove the hooks (after the backward, or when it failed)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def finish(self) -> None:
        """Start the buckets not started yet (in order), wait for every bucket and write the sums into ``.grad``.

        Raises:
            StreamtuneError: another rank died or stalled past the distributed timeout.
        """
        self.disarm()
        while self._next < len(self.buckets):
            self._start(self._next)
        for bucket, flat, work in self._in_flight:
            # NCCL: this rank's current stream waits for the all-reduce's stream (the host does not); gloo: the
            # host waits for the background thread. Either way the copies below read the sums.
            self.ctx.wait_collective(work, "gradient all-reduce")
            write_grads(self.params, bucket, flat)
        self._in_flight, self._next = [], 0

    def _on_grad(self, param: Any) -> None:
        """A post-accumulate-grad hook (on the autograd thread): count, then start the buckets that are due."""
        self._pending[self._bucket_of[id(param)]] -= 1
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._start(self._next)

    def _start(self, index: int) -> None:
        import torch

        bucket = self.buckets[index]
        grads = [self.params[i].grad if self.params[i].grad is not None else torch.zeros_like(self.params[i])
                 for i in bucket]
        # the flat copy is queued on the current stream (the backward's); NCCL's stream waits for it before reducing
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._in_flight.append((bucket, flat, self.ctx.all_reduce_sum_async(flat, "gradient all-reduce")))
        self._next = index + 1
