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


def _run(max_steps, steps, state=None, warmup_steps=2, start_step=0):
    """Run ``steps`` scheduler steps (after loading ``state``); the lrs seen, the states and the note."""
    from streamtune.train.schedule import rebase_on_resume

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    train_cfg = TrainConfig(max_steps=max_steps, lr=1e-3, warmup_steps=warmup_steps, min_lr_ratio=0.1)
    sched = build_scheduler(opt, train_cfg)
    note = None
    if state is not None:
        opt.load_state_dict(state[0])
        sched.load_state_dict(state[1])
        note = rebase_on_resume(sched, opt, train_cfg, start_step)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen, (opt.state_dict(), sched.state_dict()), note


def test_schedule_object_matches_lr_factor_and_travels_in_state():
    from streamtune.train.schedule import Schedule

    schedule = Schedule(3, 17, 0.2)
    assert [schedule(s) for s in range(17)] == [lr_factor(s, 3, 17, 0.2) for s in range(17)]
    _, (_, sched_state), _ = _run(10, 4)
    assert sched_state["lr_lambdas"][0]["max_steps"] == 10


def test_resume_with_same_max_steps_is_unchanged():
    whole, _, _ = _run(10, 10)
    first, state, _ = _run(10, 6)
    rest, _, note = _run(10, 4, state, start_step=6)
    assert note is None and first + rest == whole


def test_raised_max_steps_keeps_the_lr_continuous_and_says_so():
    first, state, _ = _run(10, 6)
    naive_next = 1e-3 * lr_factor(7, 2, 20, 0.1)
    rest, _, note = _run(20, 14, state, start_step=6)
    assert rest[0] == pytest.approx(1e-3 * lr_factor(6, 2, 10, 0.1))  # the lr the checkpoint was going to use
    assert all(b <= a for a, b in zip(rest, rest[1:]))
    assert rest[1] < rest[0] < naive_next  # without re-basing it would have jumped up
    assert rest[-1] == pytest.approx(1e-4)
    assert note.startswith(f"train.max_steps changed from 10 to 20 on resume: the learning rate continues from "
                           f"{rest[0]:.3g} at step 7 and decays by cosine to 0.0001 at step 20")
    assert f"would have jumped to {naive_next:.3g}" in note


def test_raised_after_the_run_finished_stays_at_the_floor():
    first, state, _ = _run(10, 10)
    rest, _, note = _run(15, 5, state, start_step=10)
    assert rest == pytest.approx([1e-4] * 5) and "from 10 to 15" in note


def test_old_checkpoint_without_schedule_state_is_recognised():
    first, (opt_state, sched_state), _ = _run(10, 6)
    sched_state = dict(sched_state, lr_lambdas=[{}])  # a functools.partial saved no settings
    rest, _, note = _run(20, 14, (opt_state, sched_state), start_step=6)
    assert "changed from the checkpoint's value to 20" in note
    assert rest[0] == pytest.approx(1e-3 * lr_factor(6, 2, 10, 0.1))
    assert all(b <= a for a, b in zip(rest, rest[1:]))


def test_resume_inside_warmup_continues_the_warmup():
    first, state, _ = _run(10, 1, warmup_steps=4)
    rest, _, note = _run(20, 19, state, warmup_steps=4, start_step=1)
    assert rest == pytest.approx([1e-3 * lr_factor(s, 4, 20, 0.1) for s in range(1, 20)])
    assert "from 10 to 20" in note and "re-based" not in note
