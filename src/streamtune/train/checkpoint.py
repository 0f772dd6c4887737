"""Checkpoints for exact resume, written atomically.

``RUN/checkpoints/step-N/`` holds ``lora.safetensors`` (every trainable tensor, by full name) and
``state.pt`` (optimizer, scheduler, RNG states of torch CPU/CUDA and Python, the data loader
position, the step and the last metrics), and a stock PEFT adapter (``adapter_config.json``,
``adapter_model.safetensors``, ``streamtune.json``), so ``merge``, ``generate`` and
``PeftModel.from_pretrained`` take any checkpoint. It is written as ``checkpoints/.tmp-step-N`` and renamed
with ``os.replace``, so a directory named ``step-N`` is always complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from streamtune.errors import InputError

CHECKPOINTS_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Everything the loop needs to continue bit-for-bit."""

    step: int
    trainable: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    loader: dict[str, Any] | None
    rng: dict[str, Any]
    extra: dict[str, Any]


def capture_rng() -> dict[str, Any]:
    """The RNG states of Python, torch CPU and (when present) every CUDA device."""
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, state: TrainState, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``state`` to ``RUN/checkpoints/step-N`` atomically and return that path.

    ``write_extra(tmp_dir)``, when given, adds files (the PEFT adapter) before the rename, so they
    are part of the complete checkpoint too.
    """
    import torch
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in state.trainable.items()}, str(tmp / "lora.safetensors"))
    torch.save({
        "step": state.step, "optimizer": state.optimizer, "scheduler": state.scheduler,
        "loader": state.loader, "rng": state.rng, "extra": state.extra,
    }, tmp / "state.pt")
    if write_extra is not None:
        write_extra(tmp)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    return final


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and (child / "state.pt").is_file() and (child / "lora.safetensors").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run.

    Raises:
        InputError: the run has none.
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise InputError(
            f"--resume: {str(Path(run_dir) / CHECKPOINTS_DIR)!r} holds no complete checkpoint; "
            "start a fresh run (drop --resume, or set output.overwrite=true) or set train.save_every"
        )
    return found[-1][1]


def load_checkpoint(path: str | Path) -> TrainState:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors land on the CPU)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    trainable = load_file(str(path / "lora.safetensors"))
    blob = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return TrainState(step=blob["step"], trainable=trainable, optimizer=blob["optimizer"],
                      scheduler=blob["scheduler"], loader=blob["loader"], rng=blob["rng"], extra=blob["extra"])


def remove_partial(run_dir: str | Path) -> None:
    """Delete ``.tmp-step-*`` leftovers of a run killed while writing a checkpoint."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for child in root.glob(".tmp-step-*"):
            shutil.rmtree(child, ignore_errors=True)
