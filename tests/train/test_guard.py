"""A run that fails or is stopped leaves a checkpoint that ``--resume`` continues exactly (in-process:
a NaN injected into the loss or the gradient, a stop signal mid-step and after a step)."""

from __future__ import annotations

import os
import signal

import pytest
import yaml

from streamtune.cli import main
from streamtune.train import recipe as recipe_module
from streamtune.train.checkpoint import list_checkpoints
from streamtune.train.metrics import read_metrics
from streamtune.train.recipe import Recipe

STEPS = 5
SECTIONS = {"train": {"max_steps": STEPS, "lr": 1e-2, "grad_accum": 2}, "lora": {"dropout": 0.1}}


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_dict):
    root = tmp_path_factory.mktemp("guard")
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(root / "whole", **SECTIONS)))
    assert main(["train", str(cfg)]) == 0
    return {"cfg": cfg, "losses": _losses(root / "whole")}


def _at_micro_batch(monkeypatch, step_micro, action):
    """Run ``action(part)`` on the summed loss of micro-batch ``step_micro`` = (step, index), 1-based."""
    calls = {"n": 0}
    real = recipe_module.lm_loss_sum

    def patched(model, arch, batch, chunk_tokens, *kernels):
        part = real(model, arch, batch, chunk_tokens, *kernels)
        calls["n"] += 1
        step, index = step_micro
        if calls["n"] == (step - 1) * SECTIONS["train"]["grad_accum"] + index:
            part = action(part)
        return part

    monkeypatch.setattr(recipe_module, "lm_loss_sum", patched)


def _resume_matches(reference, run, capsys):
    assert main(["train", str(reference["cfg"]), f"output.dir={run}", "--resume"]) == 0
    capsys.readouterr()
    assert _losses(run) == reference["losses"]


def test_nan_loss_stops_with_samples_and_last_good_checkpoint(reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "nan"
    _at_micro_batch(monkeypatch, (3, 2), lambda part: part * float("nan"))
    assert main(["train", str(reference["cfg"]), f"output.dir={run}"]) == 1
    err = capsys.readouterr().err
    assert "the loss is not finite at step 3" in err and "the step was not applied" in err
    assert "micro-batch 2/2: samples [[" in err and "<- non-finite loss" in err
    assert "quickstart.jsonl: " in err  # the dataset records: file, then line numbers
    assert str(run / "checkpoints" / "step-2") in err and "after step 2" in err
    assert f"streamtune train {reference['cfg']} output.dir={run} --resume" in err
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert _losses(run) == reference["losses"][:2]
    monkeypatch.undo()
    _resume_matches(reference, run, capsys)


def test_nan_gradient_at_the_first_step_keeps_the_initial_state(reference, tmp_path, monkeypatch, capsys):
    def poison_gradient(part):
        part.register_hook(lambda grad: grad * float("nan"))  # the loss stays finite
        return part

    run = tmp_path / "nan-grad"
    _at_micro_batch(monkeypatch, (1, 1), poison_gradient)
    assert main(["train", str(reference["cfg"]), f"output.dir={run}"]) == 1
    err = capsys.readouterr().err
    assert "the gradient norm is not finite at step 1" in err and "gradient norm nan" in err
    assert "micro-batch 1/2" in err and "micro-batch 2/2" in err and "non-finite loss" not in err
    assert [s for s, _ in list_checkpoints(run)] == [0] and _losses(run) == []
    monkeypatch.undo()
    _resume_matches(reference, run, capsys)


def test_signal_between_micro_batches_abandons_the_step(reference, tmp_path, monkeypatch, capsys):
    def send_sigterm(part):
        os.kill(os.getpid(), signal.SIGTERM)
        return part

    run = tmp_path / "term"
    _at_micro_batch(monkeypatch, (3, 1), send_sigterm)
    assert main(["train", str(reference["cfg"]), f"output.dir={run}"]) == 143
    err = capsys.readouterr().err
    assert "SIGTERM during step 3 (the step was abandoned before its update)" in err
    assert str(run / "checkpoints" / "step-2") in err and "--resume" in err
    assert [s for s, _ in list_checkpoints(run)] == [2]
    monkeypatch.undo()
    _resume_matches(reference, run, capsys)


def test_signal_after_a_step_checkpoints_it_and_handlers_are_restored(reference, tmp_path, monkeypatch, capsys):
    def interrupt_at_step_2(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    def sentinel(signum, frame):
        raise AssertionError("the run's own handler should have been installed")

    run = tmp_path / "int"
    monkeypatch.setattr(Recipe, "on_step_end", interrupt_at_step_2)
    previous = signal.signal(signal.SIGTERM, sentinel)
    # a known SIGINT handler too: a shell starts background jobs with SIGINT ignored
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["train", str(reference["cfg"]), f"output.dir={run}"]) == 130
        assert signal.getsignal(signal.SIGTERM) is sentinel
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    err = capsys.readouterr().err
    assert "SIGINT during step 2 (the step was finished)" in err and "stopped:" in err
    assert [s for s, _ in list_checkpoints(run)] == [2] and len(_losses(run)) == 2
    monkeypatch.undo()
    _resume_matches(reference, run, capsys)
