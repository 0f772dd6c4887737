"""``streamtune train`` as a subprocess, stopped the way a cluster scheduler (SIGTERM) or a user (Ctrl-C,
SIGINT) stops it: the checkpoint written on the way out lets ``--resume`` reproduce the uninterrupted
losses exactly; a second Ctrl-C exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from streamtune.train.checkpoint import list_checkpoints
from streamtune.train.metrics import read_metrics

STEPS = 6
SECTIONS = {"train": {"max_steps": STEPS, "lr": 1e-2, "grad_accum": 2}, "lora": {"dropout": 0.1}}
START_TIMEOUT_S = 300


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)]


def _env():
    import streamtune

    source = str(Path(streamtune.__file__).parents[1])
    # Intel MKL picks its matrix-product code path per process: without this, about 1 uninterrupted run in 5
    # differed from the others in the last bits at step 2 (4e-4 by step 6, as AdamW's first updates grow it),
    # resumed or not; with it, 24 of 24 were bit-identical
    return {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
            "MKL_CBWR": "COMPATIBLE"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_dict):
    root = tmp_path_factory.mktemp("signals")
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(root / "whole", **SECTIONS)))
    # a subprocess like the runs it is compared with (same MKL code path, see _env)
    done = subprocess.run([sys.executable, "-m", "streamtune.cli", "train", str(cfg)], capture_output=True,
                          text=True, env=_env())
    assert done.returncode == 0, done.stderr
    return {"cfg": cfg, "losses": _losses(root / "whole")}


def _start(cfg, run):
    command = [sys.executable, "-m", "streamtune.cli", "train", str(cfg), f"output.dir={run}"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + START_TIMEOUT_S
    while not read_metrics(run):  # wait for the first logged step
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no step logged in time"
        time.sleep(0.02)
    return command, proc


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_the_run_and_resume_continues_exactly(reference, tmp_path, signum, code):
    run = tmp_path / "run"
    command, proc = _start(reference["cfg"], run)
    proc.send_signal(signum)
    err = proc.communicate(timeout=START_TIMEOUT_S)[1]
    assert proc.returncode == code, err
    saved = [step for step, _ in list_checkpoints(run)]
    assert len(saved) == 1 and 1 <= saved[0] < STEPS, err
    assert f"checkpoint {run / 'checkpoints' / f'step-{saved[0]}'} holds the run after step {saved[0]}" in err
    resume = f"streamtune train {reference['cfg']} output.dir={run} --resume"
    assert resume in err
    assert len(_losses(run)) >= saved[0]
    done = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr
    # bit for bit: a resume that skipped or repeated data, or lost an RNG or optimizer state, differs
    assert _losses(run) == reference["losses"], (saved, err)


ACK = "SIGINT: stopping after a checkpoint of the current step"
AGAIN = "SIGINT again: stopping now, without writing a checkpoint"
ATTEMPTS = 4


def _double_ctrl_c(cfg, run) -> tuple[int, str]:
    """Start a run, send SIGINT inside step 2, and a second one as soon as the first is acknowledged."""
    _, proc = _start(cfg, run)
    lines: list[str] = []
    acknowledged = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if ACK in line:
                acknowledged.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(read_metrics(run)[0]["step_s"] / 4)  # into step 2
    proc.send_signal(signal.SIGINT)
    if acknowledged.wait(timeout=START_TIMEOUT_S) and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=START_TIMEOUT_S)
    reader.join(timeout=10)
    return proc.returncode, "".join(lines)


def test_second_ctrl_c_exits_at_once(tmp_path, run_dict):
    cfg = tmp_path / "run.yaml"
    # One long micro-batch per step (16 x 512 tokens, 0.7 s here). The second SIGINT goes out once the first is
    # acknowledged: two sent during one long C++ call (the backward) reach the Python handler as one. Even so
    # the run may finish its step and exit with a checkpoint before the second arrives (the handler can run at
    # the end of the step; a CI machine did so once with a fixed 50 ms gap), so a few attempts are allowed;
    # tests/train/test_guard.py checks the handler itself deterministically.
    raw = run_dict(tmp_path / "run", train={"max_steps": 50, "batch_size": 16, "grad_accum": 1})
    raw["data"]["seq_len"] = 512
    cfg.write_text(yaml.safe_dump(raw))
    outcomes = []
    for attempt in range(ATTEMPTS):
        run = tmp_path / f"run{attempt}"
        code, err = _double_ctrl_c(cfg, run)
        assert code == 130, err
        if AGAIN in err:
            assert list_checkpoints(run) == [], err
            return
        assert list_checkpoints(run), err  # the other outcome: the step ended first, with its checkpoint
        outcomes.append(err[-300:])
    pytest.fail(f"the second SIGINT never arrived before the run ended in {ATTEMPTS} attempts: {outcomes}")
