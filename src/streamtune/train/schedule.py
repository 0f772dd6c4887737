"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``."""

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


def build_scheduler(optimizer: Any, train_cfg: Any) -> Any:
    """A ``LambdaLR`` following :func:`lr_factor` for ``train_cfg`` (a TrainConfig)."""
    from functools import partial

    from torch.optim.lr_scheduler import LambdaLR

    factor = partial(lr_factor, warmup_steps=train_cfg.warmup_steps, max_steps=train_cfg.max_steps,
                     min_lr_ratio=train_cfg.min_lr_ratio)
    return LambdaLR(optimizer, factor)
