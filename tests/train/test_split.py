"""Layer split (``train.devices``) through ``streamtune train`` on two CPU "devices": the same losses and
adapter as one device, resume reproduces the uninterrupted adapter, bad inputs exit 2 naming the key."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from streamtune.cli import main
from streamtune.train.metrics import read_metrics
from streamtune.train.recipe import Recipe

TRAIN = {"max_steps": 4, "save_every": 2, "lr": 1e-2}
SPLIT = {"train": {**TRAIN, "devices": ["cpu", "cpu"]}, "memory": {"stream": "all", "layer_split": "3"}}


def _write(root, run_dict, name, **sections):
    path = root / f"{name}.yaml"
    raw = run_dict(root / name, **{"train": TRAIN, **sections})
    path.write_text(yaml.safe_dump(raw))
    return path


def _adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(got, expected):
    assert got.keys() == expected.keys() and got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_dict):
    root = tmp_path_factory.mktemp("split")
    single = _write(root, run_dict, "single")
    split = _write(root, run_dict, "split", **SPLIT)
    assert main(["train", str(single)]) == 0
    assert main(["train", str(split)]) == 0
    return {"root": root, "split_cfg": split}


def test_split_matches_one_device(runs):
    root = runs["root"]
    single, split = read_metrics(root / "single"), read_metrics(root / "split")
    assert [r["loss"] for r in split] == pytest.approx([r["loss"] for r in single], rel=1e-4, abs=1e-5)
    assert all(r["h2d_bytes"] > 0 and r["gpu_peak_bytes_per_device"] == [0, 0] for r in split)
    _assert_same_adapter(_adapter(root / "split"), _adapter(root / "single"))
    placement = json.loads((root / "split" / "placement.json").read_text())
    assert [r["layers"] for r in placement["layer_split"]] == [[0, 3], [3, 4]]
    assert placement["streamed_layers"] == [0, 1, 2, 3]


def test_split_resume_gives_the_uninterrupted_adapter(runs, monkeypatch):
    run = runs["root"] / "killed"

    def kill_at_step_2(self, step):
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Recipe, "on_step_end", kill_at_step_2)
    assert main(["train", str(runs["split_cfg"]), f"output.dir={run}"]) == 130
    monkeypatch.undo()
    assert main(["train", str(runs["split_cfg"]), f"output.dir={run}", "--resume"]) == 0
    assert [r["loss"] for r in read_metrics(run)] == pytest.approx(
        [r["loss"] for r in read_metrics(runs["root"] / "split")], rel=1e-5, abs=1e-6)
    _assert_same_adapter(_adapter(run), _adapter(runs["root"] / "split"))


@pytest.mark.parametrize("overrides, key, fix", [
    (["train.devices=[cuda:0]"], "train.devices", "two or more devices"),
    (["train.devices=[gpu0,gpu1]"], "train.devices", "cuda:N"),
    (["train.devices=[cpu,cuda:0]"], "train.devices", "mixes cpu and cuda"),
    (["train.devices=[cuda:0,cuda:0]"], "train.devices", "names a GPU twice"),
    (["train.devices=[cpu,cpu]", "memory.gpu_budgets=[24GiB]"], "memory.gpu_budgets", "one per device"),
    (["train.devices=[cpu,cpu]", "memory.gpu_budgets=[24,16GiB]"], "memory.gpu_budgets", "no unit"),
    (["train.devices=[cpu,cpu]", "memory.gpu_budget=24GiB"], "memory.gpu_budget", "memory.gpu_budgets"),
    (["train.devices=[cpu,cpu]", "memory.layer_split=half"], "memory.layer_split", "auto"),
    (["train.devices=[cpu,cpu]", "memory.layer_split=1,2"], "memory.layer_split", "need 1 boundary"),
    (["train.devices=[cpu,cpu]", "memory.layer_split=4"], "memory.layer_split", "4 decoder layers"),
    (["memory.gpu_budgets=[24GiB,16GiB]"], "memory.gpu_budgets", "memory.gpu_budget"),
    (["memory.layer_split=2"], "memory.layer_split", "train.devices"),
    (["train.devices=[cuda:0,cuda:7]", "train.device=auto"], "train.devices", "CUDA device"),
])
def test_bad_split_config_exits_2_naming_the_key(tmp_path, run_dict, capsys, overrides, key, fix):
    if "cuda:7" in overrides[0] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    path = _write(tmp_path, run_dict, "bad")
    assert main(["train", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert key in err and fix in err, err
    assert not (tmp_path / "bad" / "adapter").exists()
