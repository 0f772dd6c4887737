"""A CLI that forgives: overrides anywhere, did-you-mean, sizes need units, absolute paths in the run's
config (resume from anywhere with the run's own config.yaml), the lr note on a raised max_steps, a help
written for users, and ``plan`` on a checkpoint directory with its real parameter count."""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml

from streamtune.cli import main
from streamtune.train.metrics import read_metrics


def test_resume_from_elsewhere_with_the_runs_config_and_a_raised_max_steps(tmp_path, run_dict, capsys, monkeypatch):
    launch = tmp_path / "launch"
    launch.mkdir()
    monkeypatch.chdir(launch)
    raw = run_dict("runs/a", train={"max_steps": 3, "warmup_steps": 1, "lr": 1e-2, "min_lr_ratio": 0.1})
    (launch / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "train.max_steps=2", "run.yaml", "--resume"]) == 2  # override before CONFIG, no run yet
    assert "--resume: " in capsys.readouterr().err
    assert main(["train", "run.yaml"]) == 0
    capsys.readouterr()
    run = launch / "runs" / "a"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["output"]["dir"] == str(run) and saved["data"]["path"] == raw["data"]["path"]
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(run / "config.yaml"), "--resume", "train.max_steps=7"]) == 0  # override after a flag
    err = capsys.readouterr().err
    # the finished run's lr sat at its floor (1e-3); recomputing the cosine for 7 steps would jump back up
    naive = 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (4 - 1) / (7 - 1 - 1))))
    assert re.search(rf"note: train\.max_steps changed from 3 to 7 on resume: the learning rate stays at 0\.001 \(the "
                     rf"schedule's floor, train\.min_lr_ratio\) to step 7 .*would have jumped to {naive:.3g}", err), err
    lrs = [record["lr"] for record in read_metrics(run)]
    assert len(lrs) == 7 and lrs[2:] == pytest.approx([1e-3] * 5)
    assert not (tmp_path / "runs").exists()


def test_unknown_option_and_misplaced_override(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc_info:
        main(["train", str(tmp_path / "c.yaml"), "--resme"])
    assert exc_info.value.code == 2 and "unrecognized arguments: --resme (did you mean --resume?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc_info:
        main(["plan", "tiny-llama", "train.lr=1e-4"])
    assert exc_info.value.code == 2 and "plan takes no KEY=VALUE overrides: train.lr=1e-4" in capsys.readouterr().err
    assert main(["train", "train.lr=1e-4"]) == 2
    assert "train: no CONFIG file" in capsys.readouterr().err


def test_override_typo_suggests_the_key(write_config, capsys):
    path = write_config()
    assert main(["train", str(path), "train.max_step=3", "--resume"]) == 2
    assert "train.max_step: unknown key (did you mean 'train.max_steps'?)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [(["plan", "tiny-llama", "--gpu-memory", "24"], "--gpu-memory"),
                                        (["plan", "tiny-llama", "--host-memory", "64"], "--host-memory")])
def test_plan_size_without_unit(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag}: '{argv[-1]}' has no unit (did you mean {argv[-1]}GiB?); write 24GiB" in err


def test_train_size_without_unit(write_config, capsys):
    assert main(["train", str(write_config()), "memory.gpu_budget=24"]) == 2
    assert "memory.gpu_budget: '24' has no unit" in capsys.readouterr().err


def test_plan_on_a_checkpoint_directory_shows_its_parameter_count(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tests.loading.ckpts import save_preset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    directory = save_preset("tiny-llama", tmp_path / "ckpt")
    num_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).parameters())
    assert main(["plan", str(directory), "--gpu-memory", "2GiB", "--host-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert f"plan: {directory} ({num_params:,} params)" in out


def test_plan_params_in_billions_for_a_large_preset(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    main(["plan", "gemma4-26b-a4b", "--gpu-memory", "24GiB", "--host-memory", "64GiB"])
    assert re.search(r"plan: gemma4-26b-a4b \(25\.\d\d B params\)", capsys.readouterr().out)


def test_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit) as exc_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc_info.value.code == 0
    for command in ("train", "plan", "bench", "doctor", "merge"):
        assert re.search(rf"^    {command} +\S", out, re.M), command  # what it does
        assert re.search(rf"^  streamtune {command} ", out, re.M), command  # one example
    assert "streamtune train examples/quickstart.yaml" in out and "exit codes" in out


def test_resume_accepts_a_run_saved_with_relative_paths(tmp_path, monkeypatch, run_dict):
    from streamtune import config
    from streamtune.errors import InputError
    from streamtune.train.rundir import check_run_dir

    monkeypatch.chdir(tmp_path)
    old = run_dict("runs/old")  # what runs saved before paths were stored absolute
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "config.yaml").write_text(yaml.safe_dump(config.from_dict(old).to_dict()))
    cfg = config.load(None, [f"{section}.{key}={value}" for section, values in old.items() for key, value in values.items()
                             if not isinstance(value, (list, dict))])
    assert cfg.output.dir == str(tmp_path / "runs" / "old")
    assert check_run_dir(cfg, resume=True) == tmp_path / "runs" / "old"
    cfg.data.path = str(tmp_path / "other.jsonl")
    with pytest.raises(InputError, match=r"--resume: the config differs .* in data\.path"):
        check_run_dir(cfg, resume=True)
