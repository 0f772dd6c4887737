"""check / apply / revert over the registry."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any, Callable, Iterable

from streamtune.compat import patches
from streamtune.compat.entries import ENTRIES, FIX_INSTALLERS, by_id
from streamtune.compat.registry import Entry, Outcome, Result, in_affected_range, run_isolated, versions
from streamtune.errors import InputError

log = logging.getLogger("streamtune.compat")
# progress(phase, entry, outcome_or_None, seconds): called as each reproducer starts (outcome None) and ends.
Progress = Callable[[str, Entry, Any, float], None]


def select(ids: Iterable[str] | None = None) -> list[Entry]:
    """The entries named by ``ids`` (all when None), in registry order.

    Raises:
        InputError: an id is not in the registry (the message lists the known ids).
    """
    if ids is None:
        return list(ENTRIES)
    wanted = [i.strip().upper() for i in ids if i.strip()]
    known = by_id()
    unknown = [i for i in wanted if i not in known]
    if unknown:
        raise InputError(f"--only: unknown id(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [entry for entry in ENTRIES if entry.id in wanted]


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _report(progress: Progress | None, phase: str, entry: Entry, outcome: Any = None, seconds: float = 0.0) -> None:
    if progress is not None:
        progress(phase, entry, outcome, seconds)


def _stock_outcomes(entries: list[Entry], progress: Progress | None = None) -> dict[str, tuple[Outcome, float]]:
    """Run each distinct reproducer once, with every applied fix temporarily removed."""
    from streamtune.compat import lazy_device

    outcomes: dict[str, tuple[Outcome, float]] = {}
    shared: dict[int, tuple[Outcome, float]] = {}
    lazy_device.clear_cache()
    with patches.temporarily_removed(patches.applied_fixes(), FIX_INSTALLERS), _quiet():
        for entry in entries:
            key = id(entry.reproducer)
            _report(progress, "stock", entry)
            if key not in shared:
                shared[key] = run_isolated(entry.reproducer)
            outcomes[entry.id] = shared[key]
            _report(progress, "stock", entry, *shared[key])
    lazy_device.clear_cache()
    return outcomes


def check(ids: Iterable[str] | None = None, progress: Progress | None = None) -> list[Result]:
    """Run the reproducers on the installed stack (fixes removed while they run).

    ``progress`` (optional) hears of each reproducer as it starts and ends (see :data:`Progress`).

    Raises:
        InputError: unknown id in ``ids``.
    """
    entries = select(ids)
    installed = versions()
    outcomes = _stock_outcomes(entries, progress)
    patched = _patched_outcomes([e for e in entries if _is_applied(e)], progress)
    results = []
    for entry in entries:
        outcome, seconds = outcomes[entry.id]
        results.append(Result(
            id=entry.id, title=entry.title, reproduces=outcome.reproduces, reason=outcome.reason,
            fix_available=entry.fix_kind is not None, applied=_is_applied(entry), fix=entry.fix_note,
            in_affected_range=in_affected_range(entry.affected, installed), seconds=round(seconds, 3),
            references=list(entry.references), reproduces_with_fix=patched.get(entry.id)))
    return results


def _patched_outcomes(entries: list[Entry], progress: Progress | None = None) -> dict[str, bool | None]:
    """For entries whose fix is applied: does the bug still reproduce with the fix in place?"""
    from streamtune.compat import lazy_device

    found: dict[str, bool | None] = {}
    shared: dict[int, Outcome] = {}
    with _quiet():
        for entry in entries:
            key = id(entry.reproducer)
            _report(progress, "with fix", entry)
            if key not in shared:
                shared[key], seconds = run_isolated(entry.reproducer)
                _report(progress, "with fix", entry, shared[key], seconds)
            else:
                _report(progress, "with fix", entry, shared[key], 0.0)
            found[entry.id] = shared[key].reproduces
    lazy_device.clear_cache()
    return found


def _is_applied(entry: Entry) -> bool:
    return entry.fix_kind == "patch" and patches.is_applied(entry.fix_id)


def apply(ids: Iterable[str] | None = None, progress: Progress | None = None) -> list[str]:
    """Install the in-memory fixes whose reproducer fails on this stack; idempotent.

    Fixes already applied are kept without re-running their reproducers. Nothing on disk changes;
    ``revert()`` restores the original functions exactly.

    Returns:
        ids of the fixes applied after the call (including ones applied before).

    Raises:
        InputError: unknown id in ``ids``.
    """
    pending = [e for e in select(ids) if e.fix_kind == "patch" and not patches.is_applied(e.fix_id)]
    outcomes = _stock_outcomes(pending, progress)
    for entry in pending:
        outcome, _ = outcomes[entry.id]
        if patches.is_applied(entry.fix_id):
            continue
        if outcome.reproduces is True:
            patches.install(entry.fix_id, FIX_INSTALLERS[entry.fix_id])
            log.info("streamtune.compat: %s reproduces (%s) -> fix %s applied", entry.id, outcome.reason, entry.fix_id)
        else:
            log.info("streamtune.compat: %s: fix %s not applied (reproduces=%s: %s)",
                     entry.id, entry.fix_id, outcome.reproduces, outcome.reason)
    return patches.applied_fixes()


def revert() -> list[str]:
    """Remove every fix ``apply()`` installed; returns their ids."""
    return patches.uninstall_all()


def applied() -> list[str]:
    """Ids of the fixes currently applied."""
    return patches.applied_fixes()
