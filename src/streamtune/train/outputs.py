"""What a run writes beside its checkpoints: adapter files in each checkpoint, the best mark,
checkpoint retention, the model card and the HTML report.

The recipe calls these at each checkpoint and when it saves the final adapter. The card and the
report never stop training: their failures are warned about once.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

from streamtune.train import retention

_warned: set[str] = set()


def _warn_once(what: str, exc: Exception) -> None:
    if what not in _warned:
        _warned.add(what)
        print(f"warning: could not write {what}: {type(exc).__name__}: {exc} (training goes on)", file=sys.stderr)


def _write_checkpoint_adapter(tmp_dir: Path, model: Any, run_dir: Path, cfg: Any, base_info: dict[str, Any],
                              step: int) -> None:
    from streamtune.lora.adapter import write_adapter_files

    write_adapter_files(model, tmp_dir, base_info, base_root=run_dir)
    write_card(tmp_dir, run_dir, cfg, base_info, step)


def checkpoint_writer(model: Any, run_dir: Path, cfg: Any, base_info: dict[str, Any], step: int) -> Callable[[Path], None]:
    """``write_extra`` for :func:`streamtune.train.checkpoint.save_checkpoint`: the checkpoint is a PEFT adapter too."""
    return functools.partial(_write_checkpoint_adapter, model=model, run_dir=Path(run_dir), cfg=cfg,
                             base_info=base_info, step=step)


def write_card(adapter_dir: Path, run_dir: Path, cfg: Any, base_info: dict[str, Any], step: int | None = None) -> None:
    """The adapter's README.md model card (warns once instead of failing)."""
    try:
        from streamtune.report.card import write_model_card

        write_model_card(adapter_dir, run_dir, cfg, base_info, step)
    except Exception as exc:  # the card is documentation: never stop training for it
        _warn_once("the adapter's model card", exc)


def after_checkpoint(run_dir: Path, step: int, cfg: Any) -> None:
    """Mark the best checkpoint, drop old ones beyond ``train.keep_checkpoints``, refresh the report."""
    retention.after_checkpoint(run_dir, step, cfg.train.keep_checkpoints)
    refresh_report(run_dir)


def refresh_report(run_dir: Path) -> None:
    """Rewrite ``RUN/report.html`` (warns once instead of failing)."""
    try:
        from streamtune.report import refresh_run_report

        refresh_run_report(run_dir)
    except Exception as exc:  # e.g. the report package itself failed to import
        _warn_once("the run report", exc)
