"""The run directory: checks before any heavy work, the resolved config, resume compatibility.

Layout::

    RUN/config.yaml          resolved config, written before step 0
    RUN/metrics.jsonl        one JSON line per optimizer step
    RUN/adapter/             final LoRA adapter (stock PEFT format + tokenizer + streamtune.json)
    RUN/base/                base model of a preset run (HF format), so stock PEFT can load the adapter
    RUN/checkpoints/step-N/  resumable checkpoints
    RUN/tensorboard/         TensorBoard logs (output.tensorboard=true)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from streamtune.errors import InputError

CONFIG_FILE = "config.yaml"
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "adapter", "base", "checkpoints", "tensorboard", "report.html")
# Keys a resumed run may change without breaking exact continuation of the trained state.
# train.grad_accum may change with the number of ranks; the recipe checks the global batch stays the same.
RESUMABLE_CHANGES = ("output.", "memory.", "train.max_steps", "train.save_every", "train.eval_every",
                     "train.eval_batches", "train.device", "train.grad_accum", "train.keep_checkpoints")


def check_run_dir(cfg: Any, resume: bool) -> Path:
    """Decide whether ``cfg.output.dir`` may be used; touches nothing.

    Raises:
        InputError: a fresh run would clobber an existing run (no ``--resume`` or
            ``output.overwrite``), the path is a file or a non-run directory, or ``--resume``
            finds no run, or its saved config differs in keys that change the training.
    """
    run_dir = Path(cfg.output.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output.dir: {str(run_dir)!r} is a file; choose a directory path")
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise InputError(
                f"--resume: {str(run_dir)!r} holds no run (no {CONFIG_FILE}); drop --resume to start one"
            )
        _check_resume_config(cfg, run_dir / CONFIG_FILE)
        return run_dir
    if run_dir.is_dir() and any(run_dir.iterdir()):
        looks_like_run = any((run_dir / name).exists() for name in RUN_ENTRIES)
        if not looks_like_run:
            raise InputError(
                f"output.dir: {str(run_dir)!r} exists and holds files that are not a streamtune run; "
                "choose an empty or new directory"
            )
        if not cfg.output.overwrite:
            raise InputError(
                f"output.dir: {str(run_dir)!r} already holds a run; pass --resume to continue it, "
                "output.overwrite=true to replace it, or choose another output.dir"
            )
    return run_dir


def init_run_dir(run_dir: Path, cfg: Any, resume: bool) -> None:
    """Create (or, with overwrite, clear) the run directory and write the resolved config."""
    if not resume and run_dir.is_dir():
        for name in RUN_ENTRIES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / CONFIG_FILE)


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in raw.items() if isinstance(values, dict)
            for key, value in values.items()}


def _same(key: str, saved: Any, current: Any) -> bool:
    """Equal values; for path keys, equal once both are absolute (runs saved before paths were stored absolute)."""
    import os

    from streamtune.config import PATH_KEYS

    if saved == current:
        return True
    if key in PATH_KEYS and isinstance(saved, str) and isinstance(current, str) and saved and current:
        return os.path.abspath(os.path.expanduser(saved)) == os.path.abspath(os.path.expanduser(current))
    return False


def _check_resume_config(cfg: Any, saved_path: Path) -> None:
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    current = _flatten(cfg.to_dict())
    changed = [key for key in sorted(set(saved) | set(current))
               if not _same(key, saved.get(key), current.get(key)) and not key.startswith(RESUMABLE_CHANGES)]
    if changed:
        details = ", ".join(f"{key} ({saved.get(key)!r} -> {current.get(key)!r})" for key in changed)
        raise InputError(
            f"--resume: the config differs from the run's {CONFIG_FILE} in {details}; resume with the "
            "same config (only output.*, memory.*, train.max_steps/save_every/eval_every/eval_batches/device/"
            "keep_checkpoints, and train.grad_accum keeping the global batch, may change)"
        )
