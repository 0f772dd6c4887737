"""Garbage collection between steps: frozen after the first step, automatic collection off, undone at the end."""

from __future__ import annotations

import gc

import pytest

from streamtune.stepgc import GcPauses, StepCollector


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def gc_restored():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_collector_freezes_after_the_first_step_and_collects_every_n(gc_restored):
    gc.enable()
    collector = StepCollector(every_steps=2)
    collector.after_step(1)
    assert collector.active and not gc.isenabled() and gc.get_freeze_count() > 0
    with GcPauses() as pauses:
        collector.after_step(2)  # 2 % 2 == 0: one collection of what is not frozen
        collector.after_step(3)
        collector.after_step(4)
    assert collector.num_collections == 2 and pauses.count == 2 and pauses.seconds > 0
    collector.close()
    assert not collector.active and gc.isenabled() and gc.get_freeze_count() == 0


def test_cycles_made_between_collections_are_freed_by_the_next_one(gc_restored):
    collector = StepCollector(every_steps=1)
    collector.after_step(1)
    before = sum(isinstance(o, _Cycle) for o in gc.get_objects())
    for _ in range(100):
        _Cycle()
    assert sum(isinstance(o, _Cycle) for o in gc.get_objects()) == before + 100  # automatic collection is off
    collector.after_step(2)
    assert sum(isinstance(o, _Cycle) for o in gc.get_objects()) == before
    survivor = _Cycle()
    collector.after_step(3)  # it survives this collection (the oldest generation now holds it) ...
    del survivor
    collector.after_step(4)  # ... and becomes garbage later: the next collection frees it too
    assert sum(isinstance(o, _Cycle) for o in gc.get_objects()) == before
    collector.close()


def test_zero_leaves_python_alone_and_close_restores_a_disabled_collector(gc_restored):
    gc.enable()
    collector = StepCollector(every_steps=0)
    collector.after_step(1)
    assert not collector.active and gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    collector = StepCollector(every_steps=5)
    collector.after_step(1)
    collector.close()
    assert not gc.isenabled()  # as it was before
    with pytest.raises(ValueError, match="every_steps"):
        StepCollector(-1)


def test_pauses_count_only_while_installed():
    with GcPauses() as pauses:
        gc.collect()
    gc.collect()
    assert pauses.count == 1 and pauses.seconds >= 0
    assert pauses._on_gc not in gc.callbacks
