"""``streamtune train`` end to end on the CPU: loss falls, stock PEFT loads the adapter with the same
logits, a killed-then-resumed run reproduces the uninterrupted losses exactly, and every bad input
exits with code 2 and a message naming the key."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from streamtune.cli import main
from streamtune.train.metrics import read_metrics
from streamtune.train.recipe import Recipe
from tests.conftest import keep_cli_model

STEPS = 6
TRAIN = {"max_steps": STEPS, "save_every": 2, "lr": 1e-2, "eval_every": 3}


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_dict):
    """One uninterrupted CLI run; also captures the in-process model the CLI trained."""

    root = tmp_path_factory.mktemp("e2e")
    cfg_path = root / "run.yaml"
    raw = run_dict(root / "run", train=TRAIN, data={"eval_fraction": 0.05}, output={"tensorboard": True})
    cfg_path.write_text(yaml.safe_dump(raw))
    captured = {}
    with pytest.MonkeyPatch.context() as mp:
        keep_cli_model(mp)
        mp.setattr("streamtune.cli.train._summary", lambda result: captured.setdefault("result", result))
        code = main(["train", str(cfg_path)])
    return {"code": code, "cfg": cfg_path, "run": root / "run", "result": captured["result"], "root": root}


def test_run_succeeds_and_writes_layout(trained):
    run = trained["run"]
    assert trained["code"] == 0
    for name in ("config.yaml", "metrics.jsonl", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer.json", "adapter/streamtune.json", "base/config.json"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) == [
        "step-2", "step-4", "step-6"]
    assert (run / "report.html").is_file() and (run / "adapter" / "README.md").read_text().startswith("---")
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == STEPS and saved["model"]["name"] == "tiny-gemma4"


def test_metrics_lines_and_falling_loss(trained):
    records = read_metrics(trained["run"])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("step", "loss", "lr", "tokens", "step_s", "tok_s", "gpu_peak_bytes", "host_rss_bytes"):
        assert all(key in r for r in records), key
    assert all(r["tokens"] == 2 * 2 * 64 for r in records)
    assert all(r["host_rss_bytes"] > 0 and r["tok_s"] > 0 for r in records)
    losses = [r["loss"] for r in records]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05
    assert "eval_loss" in records[2] and "eval_loss" in records[5]
    assert records[0]["lr"] < records[1]["lr"]  # warmup


def test_adapter_loads_in_stock_peft_with_same_logits(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = trained["run"]
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(run / "base")), str(run / "adapter"))
    stock.eval()
    live = trained["result"].model
    live.eval()
    ids = torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = live(input_ids=ids, use_cache=False).logits
        got = stock(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    trained_b = [p for n, p in stock.named_parameters() if "lora_B" in n]
    assert trained_b and any(float(p.abs().max()) > 0 for p in trained_b)


def test_killed_run_resumes_bit_for_bit(trained, monkeypatch):
    cfg, root = trained["cfg"], trained["root"]
    run = root / "killed"
    out = f"output.dir={run}"

    def kill_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Recipe, "on_step_end", kill_at_step_3)
    assert main(["train", str(cfg), out, "output.tensorboard=false"]) == 130
    assert len(_losses(run)) == 3
    monkeypatch.undo()
    assert main(["train", str(cfg), out, "--resume"]) == 0
    assert _losses(run) == _losses(trained["run"])
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))


def test_resume_of_finished_run_asks_for_more_steps(trained, capsys):
    code = main(["train", str(trained["cfg"]), "--resume"])
    assert code == 2
    assert "train.max_steps" in capsys.readouterr().err


def test_existing_run_dir_is_refused_before_any_work(trained, capsys):
    before = (trained["run"] / "config.yaml").read_text()
    code = main(["train", str(trained["cfg"])])
    assert code == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "output.overwrite=true" in err
    assert (trained["run"] / "config.yaml").read_text() == before


def test_resume_with_changed_training_config_is_refused(trained, capsys):
    code = main(["train", str(trained["cfg"]), "lora.rank=8", "--resume"])
    assert code == 2
    assert "lora.rank" in capsys.readouterr().err


# ---- bad inputs: exit code 2, clear message, nothing left behind --------------------------------------


def _bad(write_config, capsys, *extra, **sections):
    path = write_config(**sections)
    code = main(["train", str(path), *extra])
    return code, capsys.readouterr().err, path.parent / "run"


def test_missing_model_path(write_config, capsys, tmp_path):
    code, err, run = _bad(write_config, capsys, model={"name": str(tmp_path / "no-such-model")})
    assert code == 2 and "model.name" in err and "no-such-model" in err
    assert not run.exists()


def test_malformed_dataset_line(write_config, capsys, tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "oops"\n')
    code, err, run = _bad(write_config, capsys, data={"path": str(data)})
    assert code == 2 and "broken.jsonl:2" in err
    assert not run.exists()


def test_missing_dataset_file(write_config, capsys, tmp_path):
    code, err, _ = _bad(write_config, capsys, data={"path": str(tmp_path / "nothing.jsonl")})
    assert code == 2 and "data.path" in err


def test_bad_config_keys_all_reported(write_config, capsys):
    code, err, run = _bad(write_config, capsys, "train.bogus=1", "lora.rank=0", model={"colour": "red"})
    assert code == 2
    for key in ("train.bogus", "lora.rank", "model.colour"):
        assert key in err
    assert not run.exists()


def test_a_wrong_switch_value_names_the_values_allowed(write_config, capsys):
    code, err, run = _bad(write_config, capsys, "train.compile_layers=sometimes")
    assert code == 2 and "train.compile_layers: 'sometimes' is not true, false or auto (empty)" in err
    assert not run.exists()


def test_a_negative_gc_interval_names_the_key_and_the_bound(write_config, capsys):
    code, err, run = _bad(write_config, capsys, "train.gc_every_steps=-1")
    assert code == 2 and "train.gc_every_steps: -1 must be >= 0" in err
    assert not run.exists()


def test_a_dist_backend_that_cannot_run_is_refused_before_any_work(write_config, capsys, monkeypatch):
    code, err, run = _bad(write_config, capsys, "train.dist_backend=nccl")  # the test config trains on the CPU
    assert code == 2 and "train.dist_backend: nccl needs train.device cuda or auto" in err
    assert not run.exists()
    code, err, run = _bad(write_config, capsys, "train.dist_backend=mpi")
    assert code == 2 and "train.dist_backend: 'mpi' is not allowed; allowed: auto, nccl, gloo" in err
    # device auto on a machine without CUDA, under torchrun: refused before the process group is joined
    from streamtune.distributed import context

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(context, "limit_malloc_arenas", lambda: None)
    monkeypatch.setattr(context, "_init_group", lambda ctx, device: pytest.fail("joined a process group"))
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    code, err, run = _bad(write_config, capsys, "train.dist_backend=nccl", "train.device=auto")
    assert code == 2 and "train.dist_backend: nccl needs CUDA, and this run trains on the CPU" in err
    assert not run.exists()
    monkeypatch.setenv("STREAMTUNE_LOCAL_SUM", "yes")  # the shared-memory sum's switch, read when the job joins
    code, err, run = _bad(write_config, capsys, "train.dist_backend=gloo")
    assert code == 2 and "STREAMTUNE_LOCAL_SUM='yes': use auto (GPU tensors), 1 (CPU tensors too) or 0 (never)" in err
    assert not run.exists()


def test_missing_config_file(capsys, tmp_path):
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_without_run_or_checkpoint(write_config, capsys):
    code, err, run = _bad(write_config, capsys, "--resume")
    assert code == 2 and "--resume" in err and "no run" in err
    from streamtune.config import load

    path = write_config(name="again.yaml")
    run.mkdir()
    load(path).save(run / "config.yaml")
    assert main(["train", str(path), "--resume"]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_unknown_lora_target(write_config, capsys):
    code, err, _ = _bad(write_config, capsys, lora={"targets": ["no_such_proj"]})
    assert code == 2 and "lora.targets" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu(write_config, capsys):
    code, err, run = _bad(write_config, capsys, train={"device": "cuda"})
    assert code == 2 and "train.device" in err
    assert not run.exists()


def test_output_dir_is_a_file(write_config, capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    code, err, _ = _bad(write_config, capsys, output={"dir": str(target)})
    assert code == 2 and "output.dir" in err


def test_overwrite_replaces_a_run(tmp_path, run_dict):
    run = tmp_path / "run"
    raw = run_dict(run, train={"max_steps": 1})
    cfg_path = tmp_path / "one.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg_path)]) == 0
    (run / "metrics.jsonl").write_text(json.dumps({"step": 99, "loss": 0.0}) + "\n")
    assert main(["train", str(cfg_path), "output.overwrite=true"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1]


def test_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit) as exc_info:
        main(["train", "--help"])
    assert exc_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("model.name", "data.seq_len", "train.grad_accum", "memory.gpu_budget", "output.dir", "--resume"):
        assert key in out


def test_version(capsys):
    from streamtune import __version__

    with pytest.raises(SystemExit) as exc_info:
        main(["--version"])
    assert exc_info.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.slow
def test_sigkilled_process_resumes_bit_for_bit(tmp_path, run_dict):
    import os
    import signal
    import subprocess
    import sys
    import time

    raw = run_dict(tmp_path / "killed", train={"max_steps": 30, "save_every": 1, "lr": 1e-2})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "streamtune.cli", "train", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step-3").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_losses(tmp_path / "killed")) < 30
    assert subprocess.run(cmd + ["--resume"], capture_output=True).returncode == 0
    assert subprocess.run(cmd + [f"output.dir={tmp_path / 'whole'}"], capture_output=True).returncode == 0
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "whole")
