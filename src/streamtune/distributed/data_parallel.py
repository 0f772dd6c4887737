"""Data parallel over the adapter parameters: which micro-batches each rank computes, and resume.

Global batch: one optimizer step consumes ``train.batch_size x train.grad_accum x world_size`` rows
(``batch_size`` rows per micro-batch). Every rank builds the same seeded batch stream and draws the
step's ``grad_accum x world_size`` micro-batches from it in order; rank ``r`` computes those whose
index ``i`` has ``i % world_size == r``. The stream's position after a step is therefore the same on
every rank and independent of the world size: a run checkpointed on 2 ranks with ``grad_accum=1``
resumes on 1 rank with ``grad_accum=2`` (same global batch) and continues the same stream. The loss
of a step stays the sum of token cross-entropies over the whole global batch divided by its total
number of loss tokens (counts are all-reduced before the backward), so the summed gradients equal
those of one process computing the global batch.

Unequal GPUs: ``STREAMTUNE_RANK_MICRO_BATCHES=6,2`` gives rank ``r`` the ``r``-th count of the step's
micro-batches (contiguous runs instead of every ``world_size``-th) so a faster GPU does more of the
work; the counts must sum to ``grad_accum x world_size``, so the global batch, the loss and the
resume position are unchanged. ``streamtune plan --gpu A,B`` prints the split it predicts best.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from streamtune.errors import InputError

GLOBAL_BATCH_KEY = "global_batch_rows"
RANK_MICRO_BATCHES_ENV = "STREAMTUNE_RANK_MICRO_BATCHES"


def global_batch_rows(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Rows per optimizer step over all ranks."""
    return batch_size * grad_accum * world_size


def rank_micro_batches(grad_accum: int, world_size: int) -> list[int] | None:
    """The per-rank micro-batch counts of ``STREAMTUNE_RANK_MICRO_BATCHES``, or None (an even split).

    Raises:
        InputError: not ``world_size`` non-negative integers summing to ``grad_accum x world_size``.
    """
    raw = os.environ.get(RANK_MICRO_BATCHES_ENV, "").strip()
    if not raw:
        return None
    total = grad_accum * world_size
    try:
        counts = [int(part) for part in raw.split(",")]
    except ValueError:
        counts = []
    if len(counts) != world_size or min(counts) < 0 or sum(counts) != total:
        raise InputError(
            f"{RANK_MICRO_BATCHES_ENV}={raw!r}: give {world_size} comma-separated counts (one per rank) that sum to "
            f"train.grad_accum x ranks = {total}, e.g. {','.join([str(grad_accum)] * world_size)}"
        )
    return counts


def take_step_batches(batches: Iterator[dict[str, Any]], grad_accum: int, ctx: Any,
                      counts: list[int] | None = None) -> list[dict[str, Any]]:
    """This rank's micro-batches of the next global step (see the module docstring).

    Every rank draws all ``grad_accum x world_size`` micro-batches so the stream's position does not
    depend on the world size; with ``counts`` rank ``r`` takes a contiguous run of ``counts[r]``.
    """
    drawn = [next(batches) for _ in range(grad_accum * ctx.world_size)]
    if counts is None:
        return drawn[ctx.rank::ctx.world_size]
    start = sum(counts[:ctx.rank])
    return drawn[start:start + counts[ctx.rank]]


def shard(items: Iterable[Any], ctx: Any) -> Iterator[Any]:
    """Every ``world_size``-th item, starting at this rank (evaluation batches)."""
    for index, item in enumerate(items):
        if index % ctx.world_size == ctx.rank:
            yield item


def check_resume_batch(saved_extra: dict[str, Any], batch_size: int, grad_accum: int, world_size: int) -> None:
    """Refuse a resume whose global batch differs from the checkpoint's.

    Raises:
        InputError: ``batch_size x grad_accum x world_size`` differs from the saved run's; the
            message gives the ``train.grad_accum`` that keeps it, when there is one.
    """
    saved = saved_extra.get(GLOBAL_BATCH_KEY)
    now = global_batch_rows(batch_size, grad_accum, world_size)
    if saved is None or int(saved) == now:
        return
    per_rank = batch_size * world_size
    fix = (f"set train.grad_accum={int(saved) // per_rank}" if int(saved) % per_rank == 0 else
           f"use a world size that divides {int(saved) // batch_size} micro-batches")
    raise InputError(
        f"--resume: the checkpoint's global batch is {saved} rows per step (train.batch_size x train.grad_accum x "
        f"ranks) but this run has {batch_size} x {grad_accum} x {world_size} = {now}; {fix} to continue the same run"
    )


class NullLogger:
    """The metrics logger of ranks other than 0: they write no metrics and show no progress."""

    def log(self, record: dict[str, Any]) -> None:
        """Drop ``record``."""

    def write(self, text: str) -> None:
        """Drop ``text``."""

    def close(self) -> None:
        """Nothing to close."""
