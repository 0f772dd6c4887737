"""Layer split on two GPUs as a user runs it: ``streamtune train`` (one process) over cuda:0/cuda:1 with a
budget per GPU. Run on a 2-GPU machine: ``pytest -q -m gpu tests/train/test_split_gpu.py``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from streamtune.train.metrics import read_metrics

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA devices")]
GIB = 1 << 30
BUDGETS = [2 * GIB, 1 * GIB]


def test_train_split_over_two_gpus_under_budgets(tmp_path, run_dict):
    raw = run_dict(tmp_path / "run", train={"device": "auto", "devices": ["cuda:0", "cuda:1"], "max_steps": 6,
                                            "lr": 1e-2, "save_every": 3},
                   memory={"gpu_budgets": ["2GiB", "1GiB"], "layer_split": "auto"})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "streamtune.cli", "train", str(cfg)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "layer split: cuda:0: layers 0-" in done.stderr
    records = read_metrics(tmp_path / "run")
    assert len(records) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    for r in records:
        peaks = r["gpu_peak_bytes_per_device"]
        assert all(0 < peak <= budget for peak, budget in zip(peaks, BUDGETS)), peaks
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())
    assert [p["device"] for p in placement["layer_split"]] == ["cuda:0", "cuda:1"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    layers_with_lora = {int(name.split("layers.")[1].split(".")[0]) for name in adapter if "layers." in name}
    first_of_gpu1 = placement["layer_split"][1]["layers"][0]
    # LoRA weights of both GPUs' layers trained and were saved
    assert min(layers_with_lora) < first_of_gpu1 <= max(layers_with_lora)
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(run / "base")), str(run / "adapter"))
    stock.eval()
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = stock(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all()
    trained_b = [p for n, p in stock.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().max()) > 0 for p in trained_b)


def test_lora_params_live_on_their_layer_device(run_dict, tmp_path):
    """In-process: each range's LoRA weights on its GPU, the rest on cuda:0; one optimizer step runs."""
    from streamtune.config import from_dict
    from streamtune.models.adapters import decoder_layers
    from streamtune.train.recipe import Recipe

    raw = run_dict(tmp_path / "inproc", train={"device": "auto", "devices": ["cuda:0", "cuda:1"], "max_steps": 1},
                   memory={"gpu_budgets": ["2GiB", "1GiB"], "layer_split": "2"})
    recipe = Recipe(from_dict(raw))
    recipe.setup()
    try:
        layers = decoder_layers(recipe.model)
        for index, layer in enumerate(layers):
            want = "cuda:0" if index < 2 else "cuda:1"
            devices = {str(p.device) for p in layer.parameters() if p.requires_grad}
            assert devices == {want}, (index, devices)
        assert {str(p.device) for p in recipe.params} == {"cuda:0", "cuda:1"}
        result = recipe.loop()
        assert all(torch.isfinite(torch.tensor(v)) for v in result.losses)
    finally:
        recipe.teardown()
