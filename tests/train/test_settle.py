"""Training gives setup's and the first step's freed heap back once each (host RAM per rank)."""

from __future__ import annotations

import streamtune.train.recipe as recipe
from tests.infer.runs import train_tiny_run


def test_training_settles_the_heap_after_setup_and_after_the_first_step(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "settle_heap", lambda: calls.append("settle"))
    train_tiny_run(tmp_path, max_steps=3, save_every=0, eval_every=0)
    assert calls == ["settle", "settle"]
