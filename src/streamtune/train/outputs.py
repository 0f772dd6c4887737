"""What a run writes beside its checkpoints: the base model of a small preset, the placement record, adapter
files in each checkpoint, the best mark, checkpoint retention, the model card and the HTML report.

The recipe calls these at each checkpoint and when it saves the final adapter. The card and the
report never stop training: their failures are warned about once.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

from streamtune.train import retention

BASE_DIR = "base"
PLACEMENT_FILE = "placement.json"
MAX_SAVED_BASE_BYTES = 2 * 2**30
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


def save_base(model_cfg: Any, codec: str, dtype: Any, base: Any, tokenizer: Any, run_dir: Path,
              is_main: bool) -> dict[str, Any]:
    """The adapter's ``base_info``; for a preset up to ``MAX_SAVED_BASE_BYTES`` also ``RUN/base`` (rank 0 writes it
    once), so stock PEFT can load the adapter onto the same random weights."""
    from streamtune.models import is_preset

    preset = is_preset(model_cfg.name)
    base_info = {
        "model_name": model_cfg.name if preset else str(Path(model_cfg.name).expanduser().resolve()),
        "preset": preset, "seed": model_cfg.seed, "dtype": str(dtype).removeprefix("torch."),
        "trust_remote_code": model_cfg.trust_remote_code, "base_dir": None, "codec": codec,
    }
    size_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
    if not preset or size_bytes > MAX_SAVED_BASE_BYTES:
        return base_info
    base_info["base_dir"] = BASE_DIR
    base_dir = Path(run_dir) / BASE_DIR
    if is_main and not (base_dir / "config.json").is_file():
        base.load_all()
        base.model.save_pretrained(str(base_dir))
        tokenizer.save_pretrained(str(base_dir))
    return base_info


def write_placement(run_dir: Path, placement: Any, device: Any, kernels: Any, kernels_applied: dict[str, Any],
                    **extra: Any) -> None:
    """``RUN/placement.json``: where each layer lives, which codec stores each frozen tensor, the kernels, and
    ``extra`` (loading, pack cache, world size, shared host copy)."""
    import json

    from streamtune.files import atomic_write_bytes

    if extra.get("pack_cache") is not None:
        extra["pack_cache"] = extra["pack_cache"].stats()
    record = {**placement.describe(), "device": str(device), "kernels": {**kernels.describe(), **kernels_applied},
              "tensor_codecs": placement.tensor_codecs(), **extra}
    atomic_write_bytes(Path(run_dir) / PLACEMENT_FILE, json.dumps(record, indent=1).encode())
