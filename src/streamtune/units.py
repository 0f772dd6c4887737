"""Memory sizes as users write them in configs and flags: ``24GiB``, ``22GB``, ``512MiB``, ``25769803776B``."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}

SIZE_FORMS = "24GiB (GiB = 2^30 bytes), 22GB (10^9 bytes), 512MiB, or a byte count with B such as 25769803776B"


def parse_bytes(text: str | int | float) -> int:
    """Parse a memory size such as ``24GiB``, ``24GB``, ``512MiB`` or ``25769803776B``.

    A number without a unit is refused rather than read as bytes (``24`` is far more likely to mean
    24 GiB than 24 bytes); Python ints and floats are taken as byte counts.

    Raises:
        ValueError: the text is not a size, or has no unit (the message lists the accepted forms).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size; write {SIZE_FORMS}")
    number, unit = match.groups()
    if not unit:
        if float(number) < 1:
            hint = " (fractions of the GPU are not accepted: give the amount)"
        else:
            hint = f" (a byte count needs B: {number}B)" if float(number) >= 2**20 else f" (did you mean {number}GiB?)"
        raise ValueError(f"{text!r} has no unit{hint}; write {SIZE_FORMS}")
    return int(float(number) * _SIZE_UNITS[unit.lower()])
