"""Reading records from JSONL and Parquet files, with errors that name file and line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamtune.errors import InputError

SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Record:
    """One dataset record and where it came from (``where`` reads ``file:line`` or ``file:row N``)."""

    data: dict[str, Any]
    where: str


def read_records(path: str, key: str = "data.path") -> list[Record]:
    """Every record of a ``.jsonl`` (one JSON object per line) or ``.parquet`` file.

    Blank JSONL lines are skipped. Parquet needs ``pyarrow`` (``pip install streamtune[parquet]``).

    Args:
        path: the file.
        key: the config key that named the file, quoted in errors.

    Raises:
        InputError: the file is missing, of an unknown type, empty, or a line is not a JSON object.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise InputError(f"{key}: {str(path)!r} {what}; give a .jsonl or .parquet file")
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{key}: {str(path)!r} has suffix {suffix or '(none)'!r}; supported: .jsonl, .parquet")
    records = _read_parquet(file, key) if suffix == ".parquet" else _read_jsonl(file, key)
    if not records:
        raise InputError(f"{key}: {str(path)!r} holds no records; add at least one")
    return records


def _read_jsonl(file: Path, key: str) -> list[Record]:
    records = []
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{key}: {file} is not UTF-8 text ({exc}); JSONL files must be UTF-8") from exc
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{line_no}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object") from exc
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a JSON object {{...}}, got {type(value).__name__}")
        records.append(Record(value, where))
    return records


def _read_parquet(file: Path, key: str) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(f"{key}: reading {file} needs pyarrow; pip install 'streamtune[parquet]'") from exc
    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for damaged files
        raise InputError(f"{key}: {file} is not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
    return [Record(row, f"{file}:row {i}") for i, row in enumerate(rows, start=1)]
