"""Python's garbage collector kept out of training steps, and the time it takes when it runs.

Problem: CPython's cyclic collector runs whenever allocation counts cross its thresholds, so it fires at
arbitrary points inside a step; a full (generation 2) pass walks every tracked object. The 26B preset
with LoRA holds 504k of them before anything compiles (measured: built on the meta device; one full
collection 243 ms on a 2-core CI-class CPU), and the first step's compiles (FX graphs, sympy expressions,
guards) add more. At 2048 tokens of the 26B preset the step is host-bound: the host's issue time *is* the
step time (0.32-0.42 s between steps on an H200), and a collection inside it is added to the step.

Solution (as torchtitan's ``GarbageCollection``): once the first step has compiled, freeze what exists
(``gc.freeze``: never walked again), turn automatic collection off and collect between steps, every
``every_steps`` steps. That collection is a full one: frozen objects are not walked, so it costs what the steps
since the last one left, and an object that outlived one collection and became garbage later is found too (a
young-generation collection would leave it). Reference cycles made by a step are then freed late, not leaked
(a step leaves no tensor in a cycle: tests/train/test_settle.py); the policy is undone at the end.
"""

from __future__ import annotations

import gc
import time
from typing import Any


class GcPauses:
    """Seconds this process spent in garbage collections while installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0
        self._started: float | None = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.count += 1
            self._started = None


class StepCollector:
    """Garbage collection between steps instead of inside them (see the module docstring).

    Use: ``after_step(step)`` after every step, ``close()`` at the end (also on errors). ``every_steps`` 0
    leaves Python's automatic collection alone.
    """

    def __init__(self, every_steps: int) -> None:
        if every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {every_steps}")
        self.every_steps = every_steps
        self.num_collections = 0
        self._was_enabled = gc.isenabled()
        self._frozen = False

    @property
    def active(self) -> bool:
        """Automatic collection is off and this collector collects between steps."""
        return self._frozen

    def after_step(self, step: int) -> bool:
        """Call between steps: the first call freezes what setup and the first step made; later calls
        collect (all generations but the frozen objects) every ``every_steps`` steps. True when it collected."""
        if not self.every_steps:
            return False
        if not self._frozen:
            gc.collect()  # the first step's compile garbage, before the survivors are frozen
            gc.freeze()
            gc.disable()
            self._frozen = True
            return True
        if step % self.every_steps == 0:
            gc.collect()
            self.num_collections += 1
            return True
        return False

    def close(self) -> None:
        """Undo the policy: unfreeze and restore automatic collection as it was."""
        if not self._frozen:
            return
        gc.unfreeze()
        if self._was_enabled:
            gc.enable()
        self._frozen = False
