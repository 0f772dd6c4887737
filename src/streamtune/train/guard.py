"""How a run stops early and still leaves a checkpoint that ``--resume`` continues exactly.

- A non-finite loss or gradient norm at step k: the optimizer step is not applied; the checkpoint
  ``step-(k-1)`` holds the last good state (LoRA weights, optimizer, scheduler, and the data position
  and RNGs as they stood when step k began); exit 1 with the samples of each micro-batch of step k.
- The first SIGINT (Ctrl-C) or SIGTERM: the step in flight is abandoned between micro-batches (its
  checkpoint is the state it began from) or, when its micro-batches are done, finished; the checkpoint
  is written and the run exits with 128 + the signal number (130, 143).
- A second signal exits at once, writing nothing more.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from streamtune.errors import StreamtuneError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
MAX_LISTED_SAMPLES = 16


class RunStopped(StreamtuneError):
    """A signal stopped the run after its checkpoint was written (exit code 128 + signal number)."""

    label = "stopped"

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def signal_exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum`` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


@dataclass
class StepStart:
    """Where the data stream and the RNGs stood when a step began."""

    loader: dict[str, Any] | None
    rng: dict[str, Any]


class StopSignals:
    """SIGINT/SIGTERM handlers that ask the loop to stop; a second signal exits at once.

    Installed only in the main thread (signal handlers cannot be set elsewhere); :meth:`restore`
    puts the previous handlers back.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"\n{name} again: stopping now, without writing a checkpoint\n".encode())
            os._exit(signal_exit_code(signum))
        self.received = signum
        os.write(2, f"\n{name}: stopping after a checkpoint of the current step "
                    f"(send it again to stop at once)\n".encode())

    @property
    def exit_code(self) -> int:
        return signal_exit_code(self.received) if self.received is not None else 0


def describe_micro_batches(micro: list[dict[str, Any]], where: Any, bad: list[int] | None = None) -> str:
    """One line per micro-batch: the sample indices of each row and the dataset records they are.

    Args:
        micro: the step's batches (each with ``sample_indices``, as the train loader yields them).
        where: ``index -> "file:line"`` (the train loader's ``where``).
        bad: indices of micro-batches whose loss was non-finite, marked in the listing.
    """
    lines = []
    for number, batch in enumerate(micro):
        rows = batch.get("sample_indices")
        if rows is None:
            lines.append(f"  micro-batch {number + 1}/{len(micro)}: sample indices unknown")
            continue
        flat = [i for row in rows for i in row]
        records = _group_by_file([where(i) for i in flat[:MAX_LISTED_SAMPLES]])
        more = f", ... ({len(flat)} in all)" if len(flat) > MAX_LISTED_SAMPLES else ""
        mark = "  <- non-finite loss" if bad and number in bad else ""
        lines.append(f"  micro-batch {number + 1}/{len(micro)}: samples {rows} ({records}{more}){mark}")
    return "\n".join(lines)


def _group_by_file(places: list[str]) -> str:
    """``["a.jsonl:3", "a.jsonl:9", "b.jsonl:1"]`` -> ``"a.jsonl: 3, 9; b.jsonl: 1"``."""
    groups: dict[str, list[str]] = {}
    for place in places:
        file, _, where = place.rpartition(":")
        groups.setdefault(file, []).append(where)
    return "; ".join(f"{file}: {', '.join(items)}" if file else ", ".join(items) for file, items in groups.items())


def non_finite_error(step: int, loss: float, grad_norm: float, micro: list[dict[str, Any]], parts: list[Any],
                     loader: Any, checkpoint: Any, resume_command: str) -> StreamtuneError:
    """The error of a step whose loss or gradient norm is NaN or inf.

    Args:
        step: the step that was not applied.
        loss: its mean token loss; grad_norm: its gradient norm.
        micro: its micro-batches; parts: their summed token losses (0-dim tensors).
        loader: the train loader (its ``where`` names a sample's dataset record).
        checkpoint: the checkpoint of the last good state.
        resume_command: the command that resumes the run.
    """
    bad = [i for i, part in enumerate(parts) if not math.isfinite(float(part))]
    where = getattr(loader, "where", lambda index: f"sample {index}")
    listing = describe_micro_batches(micro, where, bad)
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    return StreamtuneError(
        f"the {what} is not finite at step {step} (loss {loss}, gradient norm {grad_norm}); the step was not "
        f"applied. Its micro-batches (sample indices per row, then the dataset records):\n{listing}\n"
        f"checkpoint {checkpoint} holds the last good state (after step {step - 1}). Check those records "
        f"or lower train.lr in a new run. To continue from it (the same batch comes "
        f"next; memory.* and train.device may change on resume):\n  {resume_command}"
    )


def stopped_error(signals: StopSignals, step: int, abandoned: bool, checkpoint: Any, resume_command: str) -> RunStopped:
    """What a stopped run raises: which checkpoint holds it and how to resume."""
    name = signal.Signals(signals.received).name
    done = step - 1 if abandoned else step
    how = "abandoned before its update" if abandoned else "finished"
    return RunStopped(f"{name} during step {step} (the step was {how}); checkpoint {checkpoint} holds the run "
                      f"after step {done}. Resume with:\n  {resume_command}", signals.exit_code)
