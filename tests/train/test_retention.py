"""train.keep_checkpoints and the best-checkpoint mark."""

from __future__ import annotations

import json

from streamtune.train.checkpoint import list_checkpoints
from streamtune.train.retention import after_checkpoint, prune_checkpoints, read_best, update_best


def _fake_checkpoint(run_dir, step):
    path = run_dir / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    (path / "state.pt").write_bytes(b"x")
    (path / "lora.safetensors").write_bytes(b"x")


def _steps(run_dir):
    return [step for step, _ in list_checkpoints(run_dir)]


def test_keep_all_by_default(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    assert prune_checkpoints(tmp_path, 0) == []
    assert _steps(tmp_path) == [1, 2, 3]


def test_keep_newest_and_spare_the_best(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    assert update_best(tmp_path, 1, 2.0)
    assert not update_best(tmp_path, 2, 2.5)
    prune_checkpoints(tmp_path, 2)
    assert _steps(tmp_path) == [1, 3, 4]
    assert read_best(tmp_path)["step"] == 1
    assert (tmp_path / "checkpoints" / "best").resolve().name == "step-1"
    assert update_best(tmp_path, 4, 1.5)
    prune_checkpoints(tmp_path, 1)
    assert _steps(tmp_path) == [4]


def test_after_checkpoint_reads_the_eval_loss_of_its_step(tmp_path):
    records = [{"step": 1, "loss": 3.0, "eval_loss": 2.0}, {"step": 2, "loss": 2.9}, {"step": 3, "loss": 2.8, "eval_loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
        after_checkpoint(tmp_path, step, keep=1)
        if step == 2:
            assert _steps(tmp_path) == [1, 2]  # step 1 is the best so far
    assert read_best(tmp_path) == {"step": 3, "eval_loss": 1.0, "path": "step-3"}
    assert _steps(tmp_path) == [3]
