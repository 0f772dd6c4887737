"""What happens after a checkpoint is complete: mark the best one, delete the oldest beyond the limit.

``RUN/checkpoints/best.json`` records the checkpoint with the lowest eval loss among those written
on an evaluation step (``{"step", "eval_loss", "path"}``), and ``RUN/checkpoints/best`` links to
it where the file system allows links. ``train.keep_checkpoints`` (0 = all) bounds how many
``step-N`` directories stay: the newest N stay (the last is what ``--resume`` continues from), older
ones go once a new one is complete, except the best one, which is never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from streamtune.files import atomic_write_bytes
from streamtune.train.checkpoint import CHECKPOINTS_DIR, list_checkpoints
from streamtune.train.metrics import read_metrics

BEST_FILE = "best.json"
BEST_LINK = "best"


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """``best.json`` of a run, or None when no checkpoint was written on an evaluation step."""
    path = Path(run_dir) / CHECKPOINTS_DIR / BEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def update_best(run_dir: str | Path, step: int, eval_loss: float) -> bool:
    """Mark ``step-N`` as best when its eval loss is lower than the recorded best. Returns whether it is."""
    best = read_best(run_dir)
    if best is not None and best.get("eval_loss", float("inf")) <= eval_loss and best.get("step") != step:
        return False
    root = Path(run_dir) / CHECKPOINTS_DIR
    record = {"step": step, "eval_loss": eval_loss, "path": f"step-{step}"}
    atomic_write_bytes(root / BEST_FILE, (json.dumps(record) + "\n").encode())
    _link_best(root, f"step-{step}")
    return True


def _link_best(root: Path, target: str) -> None:
    link = root / BEST_LINK
    tmp = root / f".{BEST_LINK}.tmp"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError:
        pass  # best.json is the record; the link is a convenience


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (0 = all) plus the best one; delete the rest.

    Returns:
        The deleted directories.
    """
    if keep <= 0:
        return []
    best = read_best(run_dir)
    best_step = best.get("step") if best else None
    found = list_checkpoints(run_dir)
    removed = []
    for step, path in found[:-keep]:
        if step != best_step:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def after_checkpoint(run_dir: str | Path, step: int, keep: int) -> None:
    """Mark ``step-N`` best if its step evaluated lower than any before, then prune old checkpoints."""
    record = next((r for r in reversed(read_metrics(run_dir)) if r.get("step") == step), None)
    if record is not None and record.get("eval_loss") is not None:
        update_best(run_dir, step, float(record["eval_loss"]))
    prune_checkpoints(run_dir, keep)
