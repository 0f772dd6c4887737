"""``streamtune train`` on a saved tiny Gemma4 checkpoint directory: the layers come from the shards,
the loss falls, and stock PEFT loads the adapter onto the same directory with the same logits."""

from __future__ import annotations

import pytest
import torch
import yaml

from streamtune.cli import main
from streamtune.data.tokenizer import build_tiny_tokenizer
from streamtune.train.metrics import read_metrics
from tests.conftest import keep_cli_model
from tests.loading.ckpts import save_preset


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_dict):
    root = tmp_path_factory.mktemp("train-dir")
    checkpoint = save_preset("tiny-gemma4", root / "gemma4")
    build_tiny_tokenizer().save_pretrained(str(checkpoint))
    raw = run_dict(root / "run", model={"name": str(checkpoint)},
                   train={"max_steps": 6, "lr": 1e-2, "warmup_steps": 1},
                   lora={"rank": 4, "alpha": 8, "target_parameters": ["experts.gate_up_proj"]},
                   memory={"stream": "all"})
    (root / "run.yaml").write_text(yaml.safe_dump(raw))
    captured = {}
    with pytest.MonkeyPatch.context() as mp:
        keep_cli_model(mp)
        mp.setattr("streamtune.cli.train._summary", lambda result: captured.setdefault("result", result))
        code = main(["train", str(root / "run.yaml")])
    return {"code": code, "run": root / "run", "checkpoint": checkpoint, "result": captured.get("result")}


def test_trains_from_the_directory(trained):
    assert trained["code"] == 0
    losses = [r["loss"] for r in read_metrics(trained["run"])]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]) - 0.1
    assert not (trained["run"] / "base").exists()  # the directory itself is the base


def test_adapter_loads_in_stock_peft_on_the_same_directory(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(trained["checkpoint"])),
                                      str(trained["run"] / "adapter")).eval()
    live = trained["result"].model.eval()
    ids = torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = live(input_ids=ids, use_cache=False).logits
        got = stock(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cache_dir_second_run_reads_packed_layers_and_trains_the_same(tmp_path, run_dict, capfd):
    checkpoint = save_preset("tiny-gemma4", tmp_path / "gemma4", seed=2)
    build_tiny_tokenizer().save_pretrained(str(checkpoint))
    losses = []
    for attempt in range(2):
        raw = run_dict(tmp_path / f"run{attempt}", model={"name": str(checkpoint)},
                       train={"max_steps": 3, "lr": 1e-2, "warmup_steps": 1}, lora={"rank": 4, "alpha": 8},
                       memory={"stream": "all", "codec": "int8"})
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
        assert main(["train", str(tmp_path / "run.yaml"), "--cache-dir", str(tmp_path / "cache")]) == 0
        losses.append([r["loss"] for r in read_metrics(tmp_path / f"run{attempt}")])
    err = capfd.readouterr().err
    assert "0 layer(s) read" in err and "4 layer(s) read" in err and ", 0 encoded and stored" in err
    assert losses[0] == losses[1]


def test_cache_dir_with_a_preset_is_refused_before_loading(tmp_path, run_dict, capsys):
    raw = run_dict(tmp_path / "run", memory={"cache_dir": str(tmp_path / "cache")})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    assert "memory.cache_dir" in capsys.readouterr().err and not (tmp_path / "cache").exists()


def test_cache_dir_that_is_a_file_is_refused_before_loading(tmp_path, run_dict, capsys):
    checkpoint = save_preset("tiny-gemma4", tmp_path / "gemma4")
    build_tiny_tokenizer().save_pretrained(str(checkpoint))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    raw = run_dict(tmp_path / "run", model={"name": str(checkpoint)})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "run.yaml"), "--cache-dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert "memory.cache_dir" in err and "is not a directory" in err and not (tmp_path / "run").exists()
