"""Experts without LoRA through streamtune's routed forward, and the compiled routing-weighted combine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamtune.config import LoraConfig
from streamtune.kernels import apply_kernels, calls, reset, select_kernels
from streamtune.kernels.compiling import CompileFallback
from streamtune.kernels.experts import combine_routed, restore_stock_experts, route, use_fast_experts
from streamtune.lora import attach_lora
from streamtune.models.build import build_model
from tests.kernels.steps import labelled_batch, loss_and_grads, perturb_for_checks

MOE_MODELS = ["tiny-gemma4", "tiny-qwen3-moe", "tiny-mixtral"]
ROUTES = ["loop"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])


def _attention_lora_model(name, target_parameters=()):
    model, adapter = build_model(name, torch.float32, seed=1)
    cfg = LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"], target_parameters=list(target_parameters))
    model = attach_lora(model, adapter, cfg, seed=0)
    perturb_for_checks(model)
    return model, adapter


def test_combine_equals_weighting_in_sorted_order_then_gathering():
    gen = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, generator=gen)
    _, perm, _ = route(index, 6)
    proj = torch.randn(10, 3, generator=gen)
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(10))
    stock = (proj * weights.reshape(-1)[perm].unsqueeze(-1))[inverse].view(5, 2, 3).sum(1)  # transformers' order
    torch.testing.assert_close(combine_routed(proj, weights, inverse), stock, rtol=0, atol=1e-6)


def test_routed_gathers_have_the_gradients_of_index_select():
    """The permutation gathers' backward (gathers, no index_add) equals autograd's index_select backward."""
    from streamtune.kernels.experts import _ExpandTokens

    gen = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, generator=gen, requires_grad=True)
    _, perm, _ = route(index, 6)
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(10))
    hidden = torch.randn(5, 3, generator=gen, requires_grad=True)
    grad = torch.randn(5, 3, generator=gen)

    def run(fast):
        hidden.grad = weights.grad = None
        rows = _ExpandTokens.apply(hidden, perm, inverse, 2) if fast else hidden.index_select(0, perm // 2)
        combine_routed(rows * 2.0, weights, inverse, perm if fast else None).backward(grad)
        return hidden.grad.clone(), weights.grad.clone()

    for got, ref in zip(run(True), run(False)):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("route_name", ROUTES)
@pytest.mark.parametrize("name", MOE_MODELS)
def test_fp32_model_loss_and_grads_equal_stock_experts(name, route_name):
    model, adapter = _attention_lora_model(name)
    batch = labelled_batch(model.config.vocab_size)
    ref_loss, ref_grads = loss_and_grads(model, adapter, batch)
    assert use_fast_experts(model, route_name) == model.config.num_hidden_layers
    reset()
    loss, grads = loss_and_grads(model, adapter, batch)
    assert calls("fast_experts") == model.config.num_hidden_layers  # the path is taken, once per layer
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for key, ref in ref_grads.items():  # q/v LoRA of every layer: their gradients cross the experts and router
        torch.testing.assert_close(grads[key], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=key)


def test_restoring_gives_back_the_stock_experts():
    model, adapter = _attention_lora_model("tiny-qwen3-moe")
    batch = labelled_batch(model.config.vocab_size)
    ref_loss, _ = loss_and_grads(model, adapter, batch)
    assert use_fast_experts(model, "loop") == model.config.num_hidden_layers
    restore_stock_experts(model)
    reset()
    loss, _ = loss_and_grads(model, adapter, batch)
    assert calls("fast_experts") == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in model.modules() if hasattr(m, "gate_up_proj"))


def test_compiled_combine_trains_like_the_stock_experts():
    model, adapter = _attention_lora_model("tiny-gemma4")
    batch = labelled_batch(model.config.vocab_size)
    ref_loss, ref_grads = loss_and_grads(model, adapter, batch)
    choice = dataclasses.replace(select_kernels("auto", "cpu", "float32"), lora_compute_dtype=False,
                                 fused_linear_ce=False, fast_experts=True)
    assert apply_kernels(model, choice)["fast_experts_modules"] == model.config.num_hidden_layers
    loss, grads = loss_and_grads(model, adapter, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for key, ref in ref_grads.items():
        torch.testing.assert_close(grads[key], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=key)


def test_on_for_cuda_sm80_up_only_and_leaves_lora_wrapped_experts_to_the_expert_lora_path():
    assert select_kernels("auto", "cuda", "bfloat16", (9, 0)).fast_experts
    assert select_kernels("auto", "cuda", "bfloat16", (8, 9)).fast_experts
    assert not select_kernels("auto", "cuda", "float16", (7, 5)).fast_experts
    assert not select_kernels("auto", "cpu", "bfloat16").fast_experts
    assert not select_kernels("eager", "cuda", "bfloat16", (9, 0)).fast_experts
    model, _ = _attention_lora_model("tiny-qwen3-moe", target_parameters=["experts.gate_up_proj"])
    choice = dataclasses.replace(select_kernels("auto", "cpu", "float32"), fast_experts=True)
    applied = apply_kernels(model, choice)
    # every experts module has LoRA here: the expert-LoRA forward serves them, with the compiled combine
    assert applied["fast_experts_modules"] == 0 and applied["expert_lora_modules"] == model.config.num_hidden_layers


def test_a_failing_compiled_combine_warns_once_and_runs_eagerly(monkeypatch):
    import streamtune.kernels.experts as experts

    model, adapter = _attention_lora_model("tiny-gemma4")
    batch = labelled_batch(model.config.vocab_size)
    ref_loss, _ = loss_and_grads(model, adapter, batch)
    use_fast_experts(model, "loop")

    tries = []

    def refuse():
        tries.append(1)
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(experts, "_compiled_combine", refuse)
    monkeypatch.setattr(experts, "COMBINE_FALLBACK", CompileFallback("the experts' combine", "it runs uncompiled"))
    with pytest.warns(RuntimeWarning, match="combine could not be compiled.*uncompiled"):
        loss, _ = loss_and_grads(model, adapter, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert len(tries) == 1 and experts.COMBINE_FALLBACK.broken  # tried once, not once per layer
