"""Warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from streamtune.config import TrainConfig
from streamtune.train.schedule import build_scheduler, lr_factor


def test_warmup_is_linear_then_cosine_reaches_floor():
    factors = [lr_factor(s, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) for s in range(20)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)
    decay = factors[4:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    mid = 4 + (19 - 4) / 2
    assert lr_factor(int(mid), 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 4) / 15)))


def test_no_warmup_starts_at_peak_and_single_step_is_safe():
    assert lr_factor(0, 0, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(0, 0, 1, 0.5) == pytest.approx(1.0)


def test_scheduler_drives_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = build_scheduler(opt, TrainConfig(max_steps=10, lr=1e-3, warmup_steps=2, min_lr_ratio=0.1))
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-3 / 3)
    assert seen[2] == pytest.approx(1e-3)
    assert seen[-1] == pytest.approx(1e-4)
