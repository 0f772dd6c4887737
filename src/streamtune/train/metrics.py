"""Per-step metrics: ``RUN/metrics.jsonl``, optional TensorBoard, and a progress bar.

Each line of ``metrics.jsonl`` is one optimizer step: ``step`` (1-based), ``loss`` (mean over the
step's loss tokens), ``lr``, ``tokens`` (input tokens of the step), ``loss_tokens``, ``step_s``,
``tok_s``, ``grad_norm``, ``gpu_peak_bytes``, ``host_rss_bytes``, ``h2d_bytes``, ``h2d_gbps``,
``copy_wait_s``, and ``eval_loss`` on steps that evaluated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from streamtune.errors import InputError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def check_tensorboard() -> None:
    """Fail early when TensorBoard logging is asked for but not installed.

    Raises:
        InputError: tensorboard is missing.
    """
    try:
        import tensorboard  # noqa: F401
    except ImportError as exc:
        raise InputError(
            "output.tensorboard: true needs the tensorboard package; pip install 'streamtune[tensorboard]' "
            "or set output.tensorboard=false"
        ) from exc


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl`` (empty when absent)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drop records after ``last_step`` (a resumed run rewrites them)."""
    path = Path(run_dir) / METRICS_FILE
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class MetricsLogger:
    """Writes step records to jsonl (flushed per line), TensorBoard and a tqdm bar."""

    def __init__(self, run_dir: str | Path, max_steps: int, start_step: int, tensorboard: bool, progress: bool):
        self.path = Path(run_dir) / METRICS_FILE
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", file=sys.stderr,
                             dynamic_ncols=True, desc="train")

    def log(self, record: dict[str, Any]) -> None:
        """Record one optimizer step."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"train/{key}" if key != "eval_loss" else "eval/loss", value, record["step"])
        if self._bar is not None:
            self._bar.set_postfix_str(_postfix(record), refresh=False)
            self._bar.update(1)

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._file.close()


def _postfix(record: dict[str, Any]) -> str:
    parts = [f"loss={record['loss']:.4f}", f"tok/s={record['tok_s']:.0f}"]
    if "eval_loss" in record:
        parts.append(f"eval={record['eval_loss']:.4f}")
    if record.get("gpu_peak_bytes"):
        parts.append(f"gpu={record['gpu_peak_bytes'] / 2**30:.1f}GiB")
    if record.get("h2d_gbps"):
        parts.append(f"h2d={record['h2d_gbps']:.1f}GB/s")
    return " ".join(parts)
