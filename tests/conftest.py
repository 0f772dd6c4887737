"""Shared fixtures: a small, fast run config on the bundled dataset (CPU, tiny models)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "examples" / "data" / "quickstart.jsonl"


def visible_gpus(env: dict[str, str], dev: Path = Path("/dev")) -> list[str]:
    """The GPUs this process may use, found without starting CUDA: ``CUDA_VISIBLE_DEVICES`` where set, else
    the ``/dev/nvidiaN`` device files."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [gpu.strip() for gpu in env["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    found = [int(m.group(1)) for f in (dev.iterdir() if dev.is_dir() else [])
             if (m := re.fullmatch(r"nvidia(\d+)", f.name))]
    return [str(i) for i in sorted(found)]


def gpu_of_worker(worker: str, gpus: list[str]) -> str | None:
    """The one GPU pytest-xdist worker ``gwN`` gets (round-robin), or None (not a worker, or fewer than 2 GPUs)."""
    match = re.fullmatch(r"gw(\d+)", worker)
    if match is None or len(gpus) < 2:
        return None
    return gpus[int(match.group(1)) % len(gpus)]


def pytest_configure(config):
    """``pytest -m gpu -n N`` spreads its workers over the GPUs, one GPU each (set before any test starts CUDA);
    tests that need two GPUs then skip, so run them without ``-n`` (tests/distributed/test_gpu.py,
    tests/train/test_split_gpu.py)."""
    gpu = gpu_of_worker(os.environ.get("PYTEST_XDIST_WORKER", ""), visible_gpus(dict(os.environ)))
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def small_run_dict(run_dir: Path, **sections: dict) -> dict:
    """A run that trains tiny-gemma4 for a few short steps on the bundled data."""
    raw = {
        "model": {"name": "tiny-gemma4"},
        "data": {"path": str(QUICKSTART_DATA), "format": "alpaca", "seq_len": 64},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"max_steps": 4, "lr": 3e-3, "warmup_steps": 1, "batch_size": 2, "grad_accum": 2,
                  "device": "cpu", "loss_chunk_tokens": 32},
        "output": {"dir": str(run_dir), "progress": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture
def write_config(tmp_path):
    """``write_config(**sections) -> path`` of a YAML config whose run dir is ``tmp_path/run``."""

    def _write(name: str = "run.yaml", **sections: dict) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(small_run_dict(tmp_path / "run", **sections)))
        return path

    return _write


@pytest.fixture(scope="session")
def run_dict():
    """:func:`small_run_dict`, for tests that build configs themselves."""
    return small_run_dict


def keep_cli_model(mp: pytest.MonkeyPatch) -> None:
    """Make ``streamtune train`` (in-process) keep the trained model for ``TrainResult.model``: the CLI discards
    the placement at the end, and tests that compare against the live model need it decoded back."""
    import streamtune.train as train_package

    real_train = train_package.train

    def train_keeping_the_model(*args, keep_model=True, **kwargs):
        return real_train(*args, keep_model=True, **kwargs)

    mp.setattr(train_package, "train", train_keeping_the_model)

