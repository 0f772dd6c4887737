"""should_compress: which tensors of real model layouts use the codec."""

import pytest
import torch

from streamtune.quant import get_codec, should_compress


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("model.layers.0.experts.gate_up_proj", (128, 1408, 2816), True),
        ("model.layers.0.experts.down_proj", (128, 2816, 704), True),
        ("model.layers.0.self_attn.q_proj.weight", (4096, 2816), True),
        ("model.layers.0.mlp.gate_proj.weight", (2112, 2816), True),
        ("model.layers.0.mlp.experts.gate_up_proj", (8, 64, 64), True),
        ("model.layers.0.router.proj.weight", (128, 2816), False),
        ("model.layers.0.mlp.gate.weight", (128, 2048), False),
        ("model.layers.0.block_sparse_moe.gate.weight", (8, 4096), False),
        ("model.layers.0.mlp.shared_expert_gate.weight", (1, 2048), False),
        ("model.layers.0.input_layernorm.weight", (2816,), False),
        ("model.layers.0.self_attn.q_norm.weight", (256,), False),
        ("model.embed_tokens.weight", (262144, 2816), False),
        ("lm_head.weight", (262144, 2816), False),
        ("model.layers.0.self_attn.q_proj.bias", (4096,), False),
    ],
)
def test_policy_on_real_parameter_names(name, shape, expected):
    assert should_compress(name, shape, "nf4") is expected
    assert should_compress(name, shape, get_codec("int8")) is expected
    assert should_compress(name, shape, "bf16") is False


def test_policy_on_a_tiny_gemma4_model():
    from streamtune.models.build import build_model

    model, _ = build_model("tiny-gemma4", torch.bfloat16, 0)
    chosen = {name for name, p in model.named_parameters() if should_compress(name, p.shape, "int8")}
    assert any(name.endswith("experts.gate_up_proj") for name in chosen)
    assert any(name.endswith("self_attn.o_proj.weight") for name in chosen)
    assert not any("norm" in name or "router" in name or "embed" in name for name in chosen)
    assert all(p.dim() >= 2 for name, p in model.named_parameters() if name in chosen)


def test_policy_rejects_unknown_codec():
    with pytest.raises(ValueError, match="allowed: bf16"):
        should_compress("x.weight", (4, 4), "int4")
