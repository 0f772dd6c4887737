"""Call counters of the fast kernels, so tests (and benchmarks) can prove a fast path ran."""

from __future__ import annotations

CALLS: dict[str, int] = {}


def count(name: str, n: int = 1) -> None:
    """Record ``n`` calls of the fast kernel ``name``."""
    CALLS[name] = CALLS.get(name, 0) + n


def reset() -> None:
    """Forget every count."""
    CALLS.clear()


def calls(name: str) -> int:
    """Calls of ``name`` since the last :func:`reset`."""
    return CALLS.get(name, 0)
