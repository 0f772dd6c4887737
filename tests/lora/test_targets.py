"""LoRA targets that match nothing are refused with the names that exist; trainable counts per target."""

from __future__ import annotations

import pytest
import torch

from streamtune.config import LoraConfig
from streamtune.errors import InputError
from streamtune.lora import attach_lora
from streamtune.lora.targets import check_lora_targets, trainable_by_target
from streamtune.models.build import build_model


@pytest.fixture(scope="module")
def gemma():
    return build_model("tiny-gemma4", torch.float32, 0, False)


def test_unknown_module_target_lists_existing_names(gemma):
    model, _ = gemma
    with pytest.raises(InputError) as exc_info:
        check_lora_targets(model, LoraConfig(targets=["q_proj", "qproj"]))
    text = str(exc_info.value)
    assert text.startswith("lora.targets: 'qproj' matches no module of Gemma4ForCausalLM (did you mean 'q_proj'?)")
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "router.proj"):
        assert name in text, name
    assert exc_info.value.exit_code == 2


def test_unknown_target_parameter_lists_fused_parameters(gemma):
    model, _ = gemma
    with pytest.raises(InputError, match=r"lora\.target_parameters: 'experts\.gate_up' matches no parameter of "
                                         r"Gemma4ForCausalLM \(did you mean 'experts\.gate_up_proj'\?\); fused "
                                         r"parameters that exist .*: experts\.gate_up_proj, experts\.down_proj$"):
        check_lora_targets(model, LoraConfig(target_parameters=["experts.gate_up", "experts.down_proj"]))
    dense, _ = build_model("tiny-llama", torch.float32, 0, False)
    with pytest.raises(InputError, match=r"none \(this model has no fused expert parameters"):
        check_lora_targets(dense, LoraConfig(target_parameters=["experts.down_proj"]))


def test_matching_targets_pass_and_attach_checks_too(gemma):
    model, arch = gemma
    check_lora_targets(model, LoraConfig(targets=["q_proj", "mlp.down_proj"], target_parameters=["experts.down_proj"]))
    check_lora_targets(model, LoraConfig(targets="auto"))
    fresh, arch = build_model("tiny-gemma4", torch.float32, 0, False)
    with pytest.raises(InputError, match=r"lora\.target_parameters: 'experts\.nope'"):
        attach_lora(fresh, arch, LoraConfig(rank=4, target_parameters=["experts.nope"]), 0)


def test_trainable_by_target_counts_every_lora_parameter():
    model, arch = build_model("tiny-gemma4", torch.float32, 0, False)
    peft_model = attach_lora(model, arch, LoraConfig(rank=4, targets=["q_proj", "down_proj"],
                                                     target_parameters=["experts.gate_up_proj", "experts.down_proj"]), 0)
    counts = trainable_by_target(peft_model)
    assert set(counts) == {"self_attn.q_proj", "mlp.down_proj", "experts.gate_up_proj", "experts.down_proj"}
    assert all(entry["layers"] == 4 for entry in counts.values())
    assert counts["mlp.down_proj"]["per_layer"] == 4 * 96 + 64 * 4  # lora_A [r, in] + lora_B [out, r]
    assert counts["self_attn.q_proj"]["per_layer"] is None  # the global-attention layer's q_proj is wider
    assert sum(e["params"] for e in counts.values()) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    layers = peft_model.get_base_model().model.layers
    by_hand = sum(layer.self_attn.q_proj.lora_A["default"].weight.numel() + layer.self_attn.q_proj.lora_B["default"].weight.numel()
                  for layer in layers)
    assert counts["self_attn.q_proj"]["params"] == by_hand


def test_check_on_a_config_builds_nothing_real():
    from tests.loading.ckpts import gemma4_multimodal_config

    from streamtune.lora.targets import check_lora_targets_of_config

    config = gemma4_multimodal_config()
    check_lora_targets_of_config(config, LoraConfig(targets=["q_proj"], target_parameters=["experts.down_proj"]))
    with pytest.raises(InputError, match=r"lora\.targets: 'vproj' matches no module of Gemma4ForCausalLM \(did you mean .v_proj.\?\)"):
        check_lora_targets_of_config(config, LoraConfig(targets=["vproj"]))
