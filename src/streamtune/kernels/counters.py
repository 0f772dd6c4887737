"""Call counters of the fast kernels, so tests (and benchmarks) can prove a fast path ran.

Problem: a count taken inside a compiled region (a piece traced into a ``train.compile_layers`` graph) reads
the dict, so Dynamo guarded the graph on the value (``CALLS['compiled_layer'] == 10``) and recompiled it on
every call: thousands of recompiles on the 26B preset (H200). Solution: counts are host-side facts; inside a
trace nothing is counted (the compiled layer that contains the piece counts itself, outside its graph).
"""

from __future__ import annotations

CALLS: dict[str, int] = {}


def count(name: str, n: int = 1) -> None:
    """Record ``n`` calls of the fast kernel ``name`` (nothing while Dynamo traces)."""
    import torch

    if torch.compiler.is_compiling():
        return
    CALLS[name] = CALLS.get(name, 0) + n


def reset() -> None:
    """Forget every count."""
    CALLS.clear()


def calls(name: str) -> int:
    """Calls of ``name`` since the last :func:`reset`."""
    return CALLS.get(name, 0)
