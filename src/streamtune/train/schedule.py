"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``.

A resumed run whose ``train.max_steps`` changed keeps the learning rate continuous: the cosine is
re-based at the resumed step, from the factor the old schedule had reached there down to
``min_lr_ratio`` at the new last step (:func:`rebase_on_resume`), instead of jumping to where the
new schedule would have been had the run been started with the new ``max_steps``.
"""

from __future__ import annotations

import math
from typing import Any


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Warmup ramps linearly from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps; the
    cosine then falls from 1 at step ``warmup_steps`` to ``min_lr_ratio`` at step ``max_steps - 1``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """The lr factor of a run as a callable whose settings travel in the scheduler's state_dict.

    ``LambdaLR.state_dict()`` saves a callable object's ``__dict__`` and ``load_state_dict()`` restores
    it, so a resumed run knows the ``max_steps`` (and any re-basing) it was trained with.
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        self.rebase_step: int | None = None
        self.rebase_factor = 1.0

    def __call__(self, step: int) -> float:
        if self.rebase_step is None or step < self.rebase_step:
            return lr_factor(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        start = max(self.rebase_step, self.warmup_steps)
        if step < start:
            return lr_factor(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        progress = min(1.0, (step - start) / max(1, self.max_steps - 1 - start))
        top = self.rebase_factor if start == self.rebase_step else 1.0
        return self.min_lr_ratio + (top - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: Any, train_cfg: Any) -> Any:
    """A ``LambdaLR`` following :func:`lr_factor` for ``train_cfg`` (a TrainConfig)."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, Schedule(train_cfg.warmup_steps, train_cfg.max_steps, train_cfg.min_lr_ratio))


def rebase_on_resume(scheduler: Any, optimizer: Any, train_cfg: Any, start_step: int) -> str | None:
    """After ``scheduler.load_state_dict``: follow the new ``train.max_steps`` without a jump in lr.

    The next step keeps the lr the checkpoint was going to use; after warmup, the cosine then runs
    from there to ``min_lr_ratio * lr`` at the new last step. Nothing changes when ``max_steps`` is
    unchanged. Checkpoints written before the schedule travelled in the state are recognised by their
    restored lr differing from the schedule's.

    Returns:
        A note for the user (old/new max_steps, the lr now and at the end, and the lr a recomputed
        schedule would have jumped to), or None when nothing changed.
    """
    schedule = scheduler.lr_lambdas[0]
    if not isinstance(schedule, Schedule):
        return None
    peak = scheduler.base_lrs[0]
    current = optimizer.param_groups[0]["lr"]
    old_max_steps = schedule.max_steps
    expected = peak * schedule(start_step)
    if old_max_steps == train_cfg.max_steps and math.isclose(expected, current, rel_tol=1e-9, abs_tol=1e-15):
        return None
    rebased = Schedule(train_cfg.warmup_steps, train_cfg.max_steps, train_cfg.min_lr_ratio)
    if start_step >= train_cfg.warmup_steps:
        rebased.rebase_step, rebased.rebase_factor = start_step, current / peak if peak else 1.0
    jump = peak * lr_factor(start_step + 1, train_cfg.warmup_steps, train_cfg.max_steps, train_cfg.min_lr_ratio)
    schedule.__dict__.update(rebased.__dict__)
    end = peak * schedule(train_cfg.max_steps - 1)
    old = str(old_max_steps) if old_max_steps != train_cfg.max_steps else "the checkpoint's value"
    if math.isclose(current, end, rel_tol=1e-9):
        course = f"stays at {current:.3g} (the schedule's floor, train.min_lr_ratio) to step {train_cfg.max_steps}"
    else:
        course = (f"continues from {current:.3g} at step {start_step + 1} and decays by cosine to {end:.3g} at step "
                  f"{train_cfg.max_steps}")
    note = f"train.max_steps changed from {old} to {train_cfg.max_steps} on resume: the learning rate {course}"
    if rebased.rebase_step is not None:
        note += (f" (the cosine is re-based at step {start_step + 1}; recomputing it for {train_cfg.max_steps} steps "
                 f"would have jumped to {jump:.3g}); for a fresh warmup and decay, start a new run instead")
    return note
