"""The entry and result types of the known-bug registry, version checks and isolated runs."""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Callable

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")


@dataclass(frozen=True)
class Outcome:
    """What a reproducer found.

    Attributes:
        reproduces: True (bug present), False (absent), None (could not be tested here).
        reason: one sentence of evidence: the error seen, the check that passed, or why it was not tested.
    """

    reproduces: bool | None
    reason: str


@dataclass(frozen=True)
class Entry:
    """One known bug of the stock stack.

    Attributes:
        id: ``P1``..``P11`` (the published patch set) or ``N1``.. (found since).
        title: one line.
        affected: package -> PEP 440 specifier of the affected versions as published/known
            (``""`` = every version so far).
        references: upstream issues, PRs or release notes.
        reproducer: tiny-model check, seconds; raises only on unexpected trouble.
        fix_id: id of the in-memory fix (shared between entries with one cause), or None.
        fix_kind: ``"patch"`` (installed by ``compat.apply()``), ``"helper"`` (a function the user
            calls, named in ``fix_note``), or None.
        fix_note: how the fix works or what to do instead.
        published_status: the status the original patch collection gave it.
    """

    id: str
    title: str
    affected: dict[str, str]
    references: tuple[str, ...]
    reproducer: Callable[[], Outcome]
    fix_id: str | None = None
    fix_kind: str | None = None
    fix_note: str = ""
    published_status: str = ""


@dataclass
class Result:
    """One row of ``streamtune doctor``.

    ``reproduces`` is measured on the stock stack (applied fixes are lifted while the reproducer
    runs); ``reproduces_with_fix`` re-runs it with the fix in place (None when not applied).
    """

    id: str
    title: str
    reproduces: bool | None
    reason: str
    fix_available: bool
    applied: bool
    fix: str = ""
    in_affected_range: bool | None = None
    seconds: float = 0.0
    references: list[str] = field(default_factory=list)
    reproduces_with_fix: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def installed_version(package: str) -> str | None:
    """The installed distribution version of ``package``, or None when missing."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Installed versions of the stock-stack packages (None = not installed)."""
    return {name: installed_version(name) for name in PACKAGES}


def in_affected_range(affected: dict[str, str], installed: dict[str, str | None]) -> bool | None:
    """Whether every package of ``affected`` is installed in its affected range.

    Returns:
        True / False, or None when a package is missing or its version does not parse.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    verdict = True
    for package, spec in affected.items():
        version = installed.get(package)
        if version is None:
            return None
        try:
            parsed = Version(version)
        except InvalidVersion:
            return None
        if not SpecifierSet(spec).contains(parsed, prereleases=True):
            verdict = False
    return verdict


def run_isolated(reproducer: Callable[[], Outcome]) -> tuple[Outcome, float]:
    """Run a reproducer; any exception becomes ``reproduces=None`` with the exception text."""
    start = time.perf_counter()
    try:
        outcome = reproducer()
        if not isinstance(outcome, Outcome):
            outcome = Outcome(None, f"reproducer returned {type(outcome).__name__}, not an Outcome")
    except ModuleNotFoundError as exc:
        outcome = Outcome(None, f"cannot test here: {exc.name} not installed")
    except Exception as exc:  # a reproducer must never take the doctor down
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else ""
        outcome = Outcome(None, f"reproducer failed: {type(exc).__name__}: {exc}{where}")
    return outcome, time.perf_counter() - start
