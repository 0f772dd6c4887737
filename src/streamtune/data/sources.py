"""Reading records from JSONL and Parquet files and ``datasets.save_to_disk`` directories, with errors
that name file and line (or record number)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamtune.errors import InputError

SUFFIXES = (".jsonl", ".json", ".parquet")
# Files that datasets.save_to_disk writes: a Dataset (state.json) or a DatasetDict (dataset_dict.json).
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")
TRAIN_SPLIT = "train"


@dataclass(frozen=True)
class Record:
    """One dataset record and where it came from (``where`` reads ``file:line`` or ``file:row N``)."""

    data: dict[str, Any]
    where: str


def read_records(path: str, key: str = "data.path") -> list[Record]:
    """Every record of a ``.jsonl`` (one JSON object per line) or ``.parquet`` file, or of a directory
    written by ``datasets.save_to_disk`` (a ``DatasetDict`` gives its ``train`` split, or its only one).

    Blank JSONL lines are skipped. Parquet needs ``pyarrow`` (``pip install streamtune[parquet]``), a
    saved dataset needs ``datasets`` (``pip install streamtune[datasets]``).

    Args:
        path: the file.
        key: the config key that named the file, quoted in errors.

    Raises:
        InputError: the file is missing, of an unknown type, empty, or a line is not a JSON object.
    """
    file = Path(path).expanduser()
    if file.is_dir() and any((file / name).is_file() for name in SAVED_DATASET_FILES):
        records = _read_saved_dataset(file, key)
        if not records:
            raise InputError(f"{key}: {str(path)!r} holds no records; add at least one")
        return records
    if not file.is_file():
        if file.is_dir():
            raise InputError(f"{key}: {str(path)!r} is a directory but not one written by datasets.save_to_disk "
                             f"(no {' or '.join(SAVED_DATASET_FILES)}); give a .jsonl or .parquet file or such a directory")
        raise InputError(f"{key}: {str(path)!r} does not exist; give a .jsonl or .parquet file")
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


def _read_saved_dataset(directory: Path, key: str) -> list[Record]:
    try:
        import datasets
    except ImportError as exc:
        raise InputError(f"{key}: {directory} was written by datasets.save_to_disk; reading it needs the datasets "
                         f"package: pip install 'streamtune[datasets]'") from exc
    try:
        loaded = datasets.load_from_disk(str(directory))
    except Exception as exc:  # datasets raises FileNotFoundError/ValueError/pyarrow errors for damaged dirs
        raise InputError(f"{key}: {directory} is not a readable saved dataset ({type(exc).__name__}: {exc})") from exc
    split = ""
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if TRAIN_SPLIT in loaded:
            split = TRAIN_SPLIT
        elif len(names) == 1:
            split = names[0]
        else:
            raise InputError(f"{key}: {directory} holds the splits {', '.join(names)} but no {TRAIN_SPLIT!r}; "
                             f"save the split to train on (dataset_dict[NAME].save_to_disk(DIR)) and give that DIR")
        loaded = loaded[split]
    where = f"{directory}[{split}]" if split else str(directory)
    return [Record(dict(row), f"{where}: record {i}") for i, row in enumerate(loaded, start=1)]
