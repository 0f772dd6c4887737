"""Undoing a fast piece: the forward it bound on each module it marked.

Every piece of :mod:`streamtune.kernels` patches a module by binding a forward on the instance and setting
a flag attribute; the class forward is untouched, so dropping the instance attribute restores it.
"""

from __future__ import annotations

from typing import Any, Iterable


def unbind_forwards(modules: Iterable[Any], *flags: str, drop: tuple[str, ...] = ()) -> None:
    """Drop the forward bound on every module marked with one of ``flags`` (its class forward applies again),
    with the instance attributes named in ``drop`` (caches of the piece), and clear the marks."""
    for module in modules:
        for flag in flags:
            if getattr(module, flag, None):
                module.__dict__.pop("forward", None)
                for name in drop:
                    module.__dict__.pop(name, None)
                setattr(module, flag, False)
