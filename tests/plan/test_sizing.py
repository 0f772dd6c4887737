"""Byte accounting and LoRA counts of the planner against real tiny models and real PEFT."""

from __future__ import annotations

import time

import pytest
import torch

from streamtune.config import LoraConfig
from streamtune.lora import attach_lora
from streamtune.models import adapter_for
from streamtune.models.build import build_model, resolve_config
from streamtune.plan import planner
from streamtune.plan.sizing import align_up, lora_params_of_parameter, size_model
from streamtune.quant import get_codec, place_parts, should_compress

TINY = ["tiny-gemma4", "tiny-qwen3-moe", "tiny-llama", "tiny-mixtral"]


def _sized(name: str, codec: str = "bf16", rank: int = 4, targets="auto", target_parameters=()):
    config = resolve_config(name)
    if targets == "auto":
        targets = adapter_for(config).default_lora_targets
    return size_model(config, codec, rank, targets, list(target_parameters), name=name)


@pytest.mark.parametrize("name", TINY)
def test_plain_bytes_equal_real_parameter_bytes(name):
    model, _ = build_model(name, torch.bfloat16)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    sized = _sized(name)
    planned = sum(layer.plain_bytes for layer in sized.layers) + sum(t.plain_bytes for t in sized.other)
    assert planned == real
    assert sized.total_params == sum(p.numel() for p in model.parameters())
    assert sized.buffer_bytes == sum(b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.parametrize("name", ["tiny-gemma4", "tiny-qwen3-moe", "tiny-llama"])
@pytest.mark.parametrize("codec", ["bf16", "int8", "nf4"])
def test_encoded_bytes_equal_real_encoded_parts(name, codec):
    model, _ = build_model(name, torch.bfloat16)
    sized = _sized(name, codec)
    params = dict(model.named_parameters())
    impl = get_codec(codec)
    for layer in sized.layers:
        specs = []
        for t in layer.tensors:
            tensor = params[t.name].detach()
            if should_compress(t.name, tuple(tensor.shape), codec):
                parts = impl.encode(tensor)
                specs.extend(impl.layout(tuple(tensor.shape), tensor.dtype))
            else:
                parts = {"data": tensor}
                specs.extend(get_codec("bf16").layout(tuple(tensor.shape), tensor.dtype))
            assert t.encoded_bytes == sum(p.numel() * p.element_size() for p in parts.values()), t.name
            assert t.compressed == (codec != "bf16" and should_compress(t.name, tuple(tensor.shape), codec))
        _, end = place_parts(specs)
        assert layer.encoded_bytes == align_up(end)
    if codec != "bf16":
        assert sum(x.encoded_bytes for x in sized.layers) < sum(x.plain_bytes for x in sized.layers)


def _peft_trainable(name: str, rank: int, targets, target_parameters) -> int:
    model, adapter = build_model(name, torch.float32)
    cfg = LoraConfig(rank=rank, targets=targets, target_parameters=list(target_parameters))
    peft_model = attach_lora(model, adapter, cfg, seed=0)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


CASES = [
    ("tiny-gemma4", "auto", ()),
    ("tiny-gemma4", "auto", ("experts.gate_up_proj", "experts.down_proj")),
    ("tiny-gemma4", ["q_proj", "o_proj"], ("experts.down_proj",)),
    ("tiny-qwen3-moe", "auto", ()),
    ("tiny-qwen3-moe", "auto", ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
    ("tiny-llama", "auto", ()),
    ("tiny-llama", ["q_proj", "v_proj", "down_proj"], ()),
]


@pytest.mark.parametrize("name,targets,target_parameters", CASES)
def test_lora_params_equal_peft(name, targets, target_parameters):
    rank = 3
    expected = _peft_trainable(name, rank, targets, target_parameters)
    sized = _sized(name, rank=rank, targets=targets, target_parameters=target_parameters)
    assert sized.lora_params == expected
    if target_parameters:
        assert all(layer.lora_folded_bytes > 0 for layer in sized.layers)
    else:
        assert all(layer.lora_folded_bytes == 0 for layer in sized.layers)


def test_param_wrapper_count_matches_peft_formula():
    # lora_A [r*E, in], lora_B [out, r*E] whichever of the last two dims is "in".
    assert lora_params_of_parameter((8, 64, 32), 4) == 4 * 8 * (64 + 32)
    assert lora_params_of_parameter((64, 32), 4) == 4 * (64 + 32)


def test_real_26b_preset_sizes_in_well_under_a_second():
    planner.make_plan("tiny-gemma4")  # imports transformers' Gemma4 modules once
    planner._META_CACHE.clear()
    start = time.perf_counter()
    plan = planner.make_plan("gemma4-26b-a4b", codec="nf4", tokens=2048, gpu_budget_bytes=24 * 2**30)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    assert len(plan.layers) == 30
    assert abs(plan.total_params - 25.23e9) / 25.23e9 < 0.01
