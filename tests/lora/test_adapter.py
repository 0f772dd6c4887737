"""attach_lora targets, dtypes, errors; adapter save is stock PEFT; base rebuild."""

from __future__ import annotations

import json

import pytest
import torch

from streamtune.config import LoraConfig
from streamtune.errors import InputError
from streamtune.lora import (
    attach_lora,
    build_base_for_adapter,
    load_trainable_state,
    read_base_info,
    save_adapter,
    trainable_state,
)
from streamtune.models.build import build_model


def _lora_modules(model):
    return {name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A." in name}


@pytest.mark.parametrize("preset,expected", [
    ("tiny-gemma4", {"q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("tiny-llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("tiny-qwen3-moe", {"q_proj", "k_proj", "v_proj", "o_proj"}),
])
def test_auto_targets_follow_the_architecture(preset, expected):
    model, adapter = build_model(preset, torch.float32, seed=0)
    peft_model = attach_lora(model, adapter, LoraConfig(rank=2, targets="auto"), seed=0)
    names = {m.rsplit(".", 1)[-1] for m in _lora_modules(peft_model)}
    assert expected <= names
    assert not any("experts" in m or "router" in m for m in _lora_modules(peft_model))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_explicit_targets_and_seeded_init():
    model, adapter = build_model("tiny-llama", torch.float32, seed=0)
    a = attach_lora(model, adapter, LoraConfig(rank=2, targets=["q_proj", "v_proj"]), seed=5)
    assert {m.rsplit(".", 1)[-1] for m in _lora_modules(a)} == {"q_proj", "v_proj"}
    model2, _ = build_model("tiny-llama", torch.float32, seed=0)
    b = attach_lora(model2, adapter, LoraConfig(rank=2, targets=["q_proj", "v_proj"]), seed=5)
    for (na, pa), (nb, pb) in zip(trainable_state(a).items(), trainable_state(b).items()):
        assert na == nb and torch.equal(pa, pb)


def test_fused_expert_parameters():
    model, adapter = build_model("tiny-gemma4", torch.float32, seed=0)
    peft_model = attach_lora(model, adapter, LoraConfig(rank=2, targets=["q_proj"],
                                                        target_parameters=["experts.gate_up_proj", "experts.down_proj"]), seed=0)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in names)


def test_lora_weights_are_fp32_on_bf16_base():
    model, adapter = build_model("tiny-llama", torch.bfloat16, seed=0)
    peft_model = attach_lora(model, adapter, LoraConfig(rank=2), seed=0)
    dtypes = {p.dtype for p in peft_model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}


def test_unknown_target_is_an_input_error():
    model, adapter = build_model("tiny-llama", torch.float32, seed=0)
    with pytest.raises(InputError, match="lora.targets"):
        attach_lora(model, adapter, LoraConfig(rank=2, targets=["nonexistent_proj"]), seed=0)


def test_save_is_stock_peft_and_state_round_trips(tmp_path):
    from peft import PeftModel

    model, adapter = build_model("tiny-llama", torch.float32, seed=3)
    peft_model = attach_lora(model, adapter, LoraConfig(rank=2), seed=0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.uniform_(-0.1, 0.1)
    info = {"model_name": "tiny-llama", "preset": True, "seed": 3, "dtype": "float32", "base_dir": None}
    out = save_adapter(peft_model, tmp_path / "adapter", None, info)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert read_base_info(out)["seed"] == 3
    base, _ = build_base_for_adapter(out)
    stock = PeftModel.from_pretrained(base, str(out))
    ids = torch.randint(3, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    state = trainable_state(peft_model)
    fresh_model, _ = build_model("tiny-llama", torch.float32, seed=3)
    fresh = attach_lora(fresh_model, adapter, LoraConfig(rank=2), seed=1)
    load_trainable_state(fresh, state)
    assert all(torch.equal(state[k], v) for k, v in trainable_state(fresh).items())
    with pytest.raises(InputError, match="does not match"):
        load_trainable_state(fresh, {"x": torch.zeros(1)})
    save_adapter(peft_model, tmp_path / "adapter", None, info)  # replacing an existing adapter works
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_read_base_info_rejects_non_adapter_dir(tmp_path):
    with pytest.raises(InputError, match="adapter_config.json"):
        read_base_info(tmp_path)
