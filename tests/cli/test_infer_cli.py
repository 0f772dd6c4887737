"""``streamtune generate | chat | eval`` end to end on a tiny trained run."""

from __future__ import annotations

import io
import json

import pytest

from streamtune.cli import main
from tests.infer.runs import eval_losses, train_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("cli_run"))


def test_generate_prints_text_on_stdout(tiny_run, capsys):
    args = ["generate", str(tiny_run / "checkpoints" / "step-1"), "--prompt", "Name three colors.",
            "--max-new-tokens", "5", "--device", "cpu", "--stream", "all"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.strip()
    assert main(args[:-2] + ["--stream", "none"]) == 0
    assert capsys.readouterr().out == first


def test_chat_keeps_history_and_ends_on_exit(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n/reset\nhow are you?\n/exit\nnot read\n"))
    assert main(["chat", str(tiny_run), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2


def test_chat_history_goes_through_the_template(tiny_run):
    from streamtune.cli.chat import chat_loop
    from streamtune.infer import InferenceOptions, SamplingOptions, open_model

    out = io.StringIO()
    with open_model(str(tiny_run), InferenceOptions(device="cpu", max_tokens=128)) as loaded:
        history = chat_loop(loaded, io.StringIO("one\ntwo\n"), out, SamplingOptions(max_new_tokens=3), "be brief", False)
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert out.getvalue().count("\n") == 2


def test_eval_prints_loss_and_perplexity(tiny_run, capsys):
    eval_file = tiny_run.parent / "eval.jsonl"
    assert main(["eval", str(tiny_run), "--data", str(eval_file), "--batch-size", "2", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["loss"] - eval_losses(tiny_run)[2]) < 1e-4
    assert main(["eval", str(tiny_run), "--data", str(eval_file), "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["generate", "no-such-model", "--prompt", "x"], "MODEL_OR_ADAPTER"),
    (["generate", "tiny-gemma4", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "tiny-gemma4", "--prompt", "  "], "--prompt"),
    (["eval", "tiny-gemma4", "--data", "/no/such/file.jsonl"], "--data"),
    (["chat", "tiny-gemma4", "--top-p", "2"], "--top-p"),
])
def test_bad_input_exits_2_before_loading(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err
