"""A tiny trained run shared by the infer and CLI tests (2 steps, a checkpoint and an eval at each)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import QUICKSTART_DATA, small_run_dict

NUM_EVAL_RECORDS = 3


def write_eval_file(path: Path, num_records: int = NUM_EVAL_RECORDS) -> Path:
    """The first records of the bundled dataset, as a small eval file."""
    lines = [line for line in QUICKSTART_DATA.read_text().splitlines() if line.strip()][:num_records]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_tiny_run(root: Path, **train: object) -> Path:
    """Train tiny-gemma4 for 2 steps on the CPU (checkpoint + eval every step); returns the run dir."""
    from streamtune.config import from_dict
    from streamtune.train import train as run_training

    eval_file = write_eval_file(root / "eval.jsonl")
    settings = {"max_steps": 2, "lr": 1e-2, "save_every": 1, "eval_every": 1, "eval_batches": 100,
                "grad_accum": 1, "seed": 0, **train}
    raw = small_run_dict(root / "run", data={"eval_path": str(eval_file), "seq_len": 32}, train=settings)
    run_training(from_dict(raw))
    return root / "run"


def eval_losses(run_dir: Path) -> dict[int, float]:
    """``{step: eval_loss}`` from the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
