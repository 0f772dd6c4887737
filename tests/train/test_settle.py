"""Training gives setup's and the first step's freed heap back once each (host RAM per rank) and keeps Python's
garbage collection between steps."""

from __future__ import annotations

import streamtune.train.recipe as recipe
from tests.infer.runs import train_tiny_run


def test_training_settles_the_heap_after_setup_and_after_the_first_step(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "settle_heap", lambda: calls.append("settle"))
    train_tiny_run(tmp_path, max_steps=3, save_every=0, eval_every=0)
    assert calls == ["settle", "settle"]


def test_training_collects_between_steps_and_restores_the_collector(tmp_path, monkeypatch):
    import gc

    seen = []
    real_after_step = recipe.StepCollector.after_step

    def spy(self, step):
        real_after_step(self, step)
        seen.append((step, self.active, gc.isenabled(), gc.get_freeze_count() > 0))

    monkeypatch.setattr(recipe.StepCollector, "after_step", spy)
    enabled = gc.isenabled()
    train_tiny_run(tmp_path, max_steps=3, save_every=0, eval_every=0, gc_every_steps=2)
    assert seen == [(1, True, False, True), (2, True, False, True), (3, True, False, True)]
    assert gc.isenabled() == enabled and gc.get_freeze_count() == 0
