"""Per-step metrics: ``RUN/metrics.jsonl``, optional TensorBoard and Weights & Biases, and progress.

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


def check_wandb(project: str | None) -> None:
    """Fail early when Weights & Biases logging is asked for but wandb is not installed.

    Raises:
        InputError: wandb is missing.
    """
    if not project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise InputError(
            f"output.wandb: {project!r} needs the wandb package; pip install wandb (then wandb login) "
            "or remove output.wandb"
        ) from exc


def check_loggers(output: Any) -> None:
    """Check every logger ``output`` (OutputConfig) asks for, before any heavy work.

    Raises:
        InputError: tensorboard or wandb asked for but not installed.
    """
    if output.tensorboard:
        check_tensorboard()
    check_wandb(getattr(output, "wandb", None))


def progress_every(max_steps: int) -> int:
    """Steps between progress lines when stderr is not a terminal: about 20 lines per run."""
    return max(1, max_steps // 20)


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
    """Writes step records to jsonl (flushed per line), TensorBoard, Weights & Biases and the progress.

    Progress is a tqdm bar on a terminal; when stderr is not a terminal (a log file, CI) it is one
    line every :func:`progress_every` steps and at the last step.
    """

    def __init__(self, run_dir: str | Path, max_steps: int, start_step: int, tensorboard: bool, progress: bool,
                 wandb_project: str | None = None, run_config: dict[str, Any] | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.max_steps = max_steps
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        self._wandb = _start_wandb(wandb_project, run_dir, run_config)
        self._bar = None
        self._line_every = 0
        self._recent_step_s: list[float] = []
        if progress and _is_terminal(sys.stderr):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", file=sys.stderr,
                             dynamic_ncols=True, desc="train")
        elif progress:
            self._line_every = progress_every(max_steps)

    def log(self, record: dict[str, Any]) -> None:
        """Record one optimizer step."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"train/{key}" if key != "eval_loss" else "eval/loss", value, record["step"])
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                            step=record["step"])
        if self._bar is not None:
            self._bar.set_postfix_str(_postfix(record), refresh=False)
            self._bar.update(1)
        elif self._line_every:
            self._print_line(record)

    def _print_line(self, record: dict[str, Any]) -> None:
        """Off a terminal: one line every ``_line_every`` steps, with the ETA from the last 20 step times."""
        if record.get("step_s"):
            self._recent_step_s = [*self._recent_step_s[-19:], float(record["step_s"])]
        if record["step"] % self._line_every and record["step"] != self.max_steps:
            return
        line = f"step {record['step']}/{self.max_steps} {_postfix(record)}"
        if self._recent_step_s and record["step"] < self.max_steps:
            left_s = (self.max_steps - record["step"]) * sum(self._recent_step_s) / len(self._recent_step_s)
            line += f" eta={_clock(left_s)}"
        print(line, file=sys.stderr, flush=True)

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
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        self._file.close()


def _clock(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _start_wandb(project: str | None, run_dir: str | Path, run_config: dict[str, Any] | None) -> Any:
    """A wandb run logging to ``project`` (id derived from the run directory, so --resume continues it)."""
    if not project:
        return None
    import hashlib

    import wandb

    run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=project, name=Path(run_dir).resolve().name, id=run_id, config=run_config or {},
                      dir=str(run_dir), resume="allow")


def _postfix(record: dict[str, Any]) -> str:
    parts = [f"loss={record['loss']:.4f}", f"tok/s={record['tok_s']:.0f}"]
    if "eval_loss" in record:
        parts.append(f"eval={record['eval_loss']:.4f}")
    if record.get("gpu_peak_bytes"):
        parts.append(f"gpu={record['gpu_peak_bytes'] / 2**30:.1f}GiB")
    if record.get("h2d_gbps"):
        parts.append(f"h2d={record['h2d_gbps']:.1f}GB/s")
    return " ".join(parts)
