"""Training steps with fused norms/activations and with regional layer compile equal the stock step (CPU, fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamtune.config import LoraConfig
from streamtune.kernels import apply_kernels, calls, reset, select_kernels
from streamtune.kernels.fused import restore_stock_norms_and_activation
from streamtune.kernels.regional import restore_layers
from streamtune.lora import attach_lora
from streamtune.models import decoder
from streamtune.models.build import build_model
from streamtune.train.loss import count_valid_tokens, lm_loss_sum


def _model(name):
    model, adapter = build_model(name, torch.float32, seed=1)
    model = attach_lora(model, adapter, LoraConfig(rank=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "norm" in pname and not p.requires_grad:  # norms away from their init, so the scale matters
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), adapter


def _step(model, adapter, seq=24):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, seq), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    model.zero_grad(set_to_none=True)
    loss = lm_loss_sum(model, adapter, batch, 7, None) / count_valid_tokens(labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, ref):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-gemma4", "tiny-llama"])
def test_fused_norms_and_activation_step_equals_stock(name):
    model, adapter = _model(name)
    ref = _step(model, adapter)
    choice = dataclasses.replace(select_kernels("auto", "cpu", "float32"), fused_norm_act=True)
    applied = apply_kernels(model, choice)
    assert applied["fused_norms"] > 0 and applied["fused_activations"] == model.config.num_hidden_layers
    reset()
    _assert_same(_step(model, adapter), ref)
    assert calls("rms_norm_scaled") > 0 and calls("fused_compiled") > 0
    assert calls("gelu_tanh_mul" if name == "tiny-gemma4" else "silu_mul") >= model.config.num_hidden_layers
    restore_stock_norms_and_activation(model)
    reset()
    _assert_same(_step(model, adapter), ref)
    assert calls("fused_compiled") == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma4"])
def test_regional_layer_compile_step_equals_stock_without_a_compile_per_layer(name):
    from torch._dynamo.utils import counters

    model, adapter = _model(name)
    ref = _step(model, adapter)
    torch._dynamo.reset()
    counters.clear()
    choice = select_kernels("auto", "cpu", "float32", compile_layers=True)
    assert apply_kernels(model, choice)["compiled_layers"] == model.config.num_hidden_layers
    reset()
    _assert_same(_step(model, adapter), ref)
    assert calls("compiled_layer") == model.config.num_hidden_layers
    layer_kinds = len(set(getattr(model.config, "layer_types", None) or ["one"]))
    graphs = counters["stats"]["unique_graphs"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    # measured: tiny-llama 1 graph for 3 layers; tiny-gemma4 5 for 4 layers of 2 kinds
    assert graphs <= 1 + 2 * layer_kinds, dict(counters["stats"])
    _step(model, adapter, seq=40)  # a new length: dynamic shapes, no new graph
    assert counters["stats"]["unique_graphs"] == graphs
    restore_layers(decoder(model).layers)
    assert all("forward" not in layer.__dict__ for layer in decoder(model).layers)


def test_layers_the_engine_wrapped_are_not_compiled_over():
    """Compiling after placement would replace the engine's forward, which binds the weights first: refused."""
    from streamtune.kernels.regional import compile_layers

    model, _ = _model("tiny-llama")
    layers = decoder(model).layers
    layers[1].forward = lambda *args, **kwargs: None  # what StreamEngine._wrap does, in effect
    with pytest.raises(RuntimeError, match="decoder layer 1 already has a forward of its own"):
        compile_layers(layers)
    assert all(type(layer).__name__ != "function" and "_streamtune_compiled_layer" not in layer.__dict__
               for layer in layers)  # none patched


@pytest.mark.slow
def test_regional_layer_compile_with_expert_lora_equals_stock():
    """Expert LoRA (``lora.target_parameters``) inside compiled layers: the CPU's loop route reads its offsets on
    the host, a graph break per experts call (measured: 17 graphs, 12 breaks on tiny Qwen3-MoE), same numbers."""
    model, adapter = build_model("tiny-qwen3-moe", torch.float32, seed=1)
    lora = LoraConfig(rank=4, alpha=8, target_parameters=list(adapter.expert_parameters))
    model = attach_lora(model, adapter, lora, seed=0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.05)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ref = _step(model, adapter)
    torch._dynamo.reset()
    applied = apply_kernels(model, select_kernels("auto", "cpu", "float32", compile_layers=True))
    assert applied["expert_lora_modules"] == applied["compiled_layers"] == model.config.num_hidden_layers
    reset()
    _assert_same(_step(model, adapter), ref)
    assert calls("compiled_layer") == model.config.num_hidden_layers
