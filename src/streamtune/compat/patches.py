"""In-memory patches with exact reversal: every replaced attribute is recorded once."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("streamtune.compat")

_MISSING = object()


@dataclass
class PatchSet:
    """The attributes one fix replaced, so the fix can be undone exactly.

    Attributes:
        fix_id: the fix this set belongs to.
        originals: ``(owner, attribute name, original value or _MISSING)`` in application order.
    """

    fix_id: str
    originals: list[tuple[Any, str, Any]] = field(default_factory=list)

    def replace(self, owner: Any, name: str, value: Any) -> None:
        """Set ``owner.name = value``, remembering what was there (in ``owner.__dict__``) before."""
        self.originals.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def revert(self) -> None:
        """Restore every replaced attribute, newest first."""
        for owner, name, original in reversed(self.originals):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self.originals.clear()


_APPLIED: dict[str, PatchSet] = {}


def is_applied(fix_id: str) -> bool:
    return fix_id in _APPLIED


def applied_fixes() -> list[str]:
    """Ids of the fixes currently applied, in application order."""
    return list(_APPLIED)


def install(fix_id: str, installer: Any) -> bool:
    """Run ``installer(patch_set)`` once for ``fix_id``; a second call does nothing.

    Returns:
        True when the fix was installed by this call.
    """
    if fix_id in _APPLIED:
        return False
    patch_set = PatchSet(fix_id)
    try:
        installer(patch_set)
    except BaseException:
        patch_set.revert()
        raise
    _APPLIED[fix_id] = patch_set
    log.info("streamtune.compat: applied fix %s (%d attribute(s) patched)", fix_id, len(patch_set.originals))
    return True


def uninstall(fix_id: str) -> bool:
    """Undo ``fix_id`` if applied. Returns True when something was reverted."""
    patch_set = _APPLIED.pop(fix_id, None)
    if patch_set is None:
        return False
    patch_set.revert()
    log.info("streamtune.compat: reverted fix %s", fix_id)
    return True


def uninstall_all() -> list[str]:
    """Undo every applied fix, newest first; returns their ids."""
    reverted = []
    for fix_id in reversed(list(_APPLIED)):
        uninstall(fix_id)
        reverted.append(fix_id)
    return reverted


class temporarily_removed:
    """Context manager: revert ``fix_ids`` for the duration (so a reproducer sees the stock stack)."""

    def __init__(self, fix_ids: list[str], installers: dict[str, Any]):
        self.fix_ids = [f for f in fix_ids if f in _APPLIED]
        self.installers = installers

    def __enter__(self) -> "temporarily_removed":
        for fix_id in self.fix_ids:
            uninstall(fix_id)
        return self

    def __exit__(self, *exc: Any) -> None:
        for fix_id in self.fix_ids:
            install(fix_id, self.installers[fix_id])
