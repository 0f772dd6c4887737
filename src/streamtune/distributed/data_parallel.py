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
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from streamtune.errors import InputError

GLOBAL_BATCH_KEY = "global_batch_rows"


def global_batch_rows(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Rows per optimizer step over all ranks."""
    return batch_size * grad_accum * world_size


def take_step_batches(batches: Iterator[dict[str, Any]], grad_accum: int, ctx: Any) -> list[dict[str, Any]]:
    """This rank's ``grad_accum`` micro-batches of the next global step (see the module docstring)."""
    drawn = [next(batches) for _ in range(grad_accum * ctx.world_size)]
    return drawn[ctx.rank::ctx.world_size]


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
