"""``streamtune plan``: table, JSON and exit codes."""

from __future__ import annotations

import json

import pytest

from streamtune.cli import main


@pytest.fixture(autouse=True)
def no_measured_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def test_table(capsys):
    assert main(["plan", "tiny-gemma4", "--gpu-memory", "2GiB", "--host-memory", "8GiB", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "GPU peak / budget" in out and "tensor group" in out and "limited by" in out


def test_json(capsys):
    code = main(["plan", "gemma4-26b-a4b", "--gpu-memory", "24GiB", "--host-memory", "64GiB", "--codec", "int8",
                 "--tokens", "2048", "--lora-rank", "8", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["fits"] is True
    for key in ("gpu_peak_bytes", "host_peak_bytes", "step_seconds", "tokens_per_second", "limited_by", "layers"):
        assert key in data
    assert data["codec"] == "int8" and data["lora_rank"] == 8 and data["gpu_budget_bytes"] == 24 * 2**30
    assert len(data["layers"]) == 30 and data["layers"][0]["placement"] in ("resident", "streamed")


def test_does_not_fit_exits_2_with_shortfall_and_knob(capsys):
    code = main(["plan", "gemma4-26b-a4b", "--gpu-memory", "6GiB", "--host-memory", "64GiB"])
    err = capsys.readouterr().err
    assert code == 2
    assert "exceeds the GPU budget 6.00 GiB by" in err and "--tokens" in err and "--gpu-memory" in err


def test_does_not_fit_json_exits_2(capsys):
    code = main(["plan", "gemma4-26b-a4b", "--gpu-memory", "6GiB", "--host-memory", "64GiB", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 2 and data["fits"] is False and data["suggestions"]


@pytest.mark.parametrize("argv,needle", [
    (["plan", "tiny-llama", "--gpu-memory", "lots"], "--gpu-memory"),
    (["plan", "tiny-llama", "--host-memory", "0"], "--host-memory"),
    (["plan", "tiny-llama", "--tokens", "0"], "tokens"),
    (["plan", "no-such-model"], "preset"),
])
def test_bad_input_exits_2(capsys, argv, needle):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_unknown_codec_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "tiny-llama", "--codec", "fp8"])
    assert info.value.code == 2
