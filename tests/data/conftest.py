"""Shared fixtures of the data tests: the tiny tokenizer and small dataset files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamtune.config import DataConfig
from streamtune.data import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tok():
    return build_tiny_tokenizer()


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _data_cfg(path: Path, **overrides) -> DataConfig:
    cfg = DataConfig(path=str(path))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture
def write_jsonl():
    """``write_jsonl(path, records)``: records are dicts (dumped) or raw lines (strings)."""
    return _write_jsonl


@pytest.fixture
def data_cfg():
    """``data_cfg(path, **overrides)``: a DataConfig for ``path``."""
    return _data_cfg
