"""LoRA in the compute dtype: same numbers as PEFT in fp32, bf16 products with fp32 master weights."""

from __future__ import annotations

import torch

from streamtune.config import LoraConfig
from streamtune.kernels import apply_kernels, calls, reset, select_kernels
from streamtune.kernels.lora import restore_stock_lora, use_compute_dtype_lora
from streamtune.lora import attach_lora
from streamtune.models.build import build_model
from tests.kernels.steps import labelled_batch, loss_and_grads


def _lora_model(name, dtype, seed=1):
    model, adapter = build_model(name, dtype, seed=seed)
    model = attach_lora(model, adapter, LoraConfig(rank=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, adapter


def test_fp32_fast_lora_equals_peft():
    for name in ("tiny-gemma4", "tiny-llama"):
        model, adapter = _lora_model(name, torch.float32)
        batch = labelled_batch(model.config.vocab_size)
        ref_loss, ref_grads = loss_and_grads(model, adapter, batch)
        reset()
        assert use_compute_dtype_lora(model) > 0
        loss, grads = loss_and_grads(model, adapter, batch)
        assert calls("lora_compute_dtype") > 0
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for key, ref in ref_grads.items():
            torch.testing.assert_close(grads[key], ref, rtol=1e-4, atol=1e-6)
        restore_stock_lora(model)
        reset()
        loss_and_grads(model, adapter, batch)
        assert calls("lora_compute_dtype") == 0


def test_bf16_layer_keeps_fp32_master_weights_and_computes_in_bf16():
    model, _ = _lora_model("tiny-llama", torch.bfloat16)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    ref = layer(x)
    (ref_grad_a,) = torch.autograd.grad(ref.float().square().sum(), layer.lora_A["default"].weight)
    use_compute_dtype_lora(model)
    got = layer(x)
    assert got.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    (grad_a,) = torch.autograd.grad(got.float().square().sum(), layer.lora_A["default"].weight)
    assert grad_a.dtype == torch.float32
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    cosine = torch.nn.functional.cosine_similarity(grad_a.flatten(), ref_grad_a.flatten(), dim=0)
    assert cosine > 0.99


def test_apply_kernels_patches_bf16_lora_only_when_selected():
    model, adapter = _lora_model("tiny-qwen3-moe", torch.bfloat16)
    applied = apply_kernels(model, select_kernels("eager", "cpu", "bfloat16"))
    assert applied == {"lora_layers": 0, "attention": None, "expert_lora_modules": 0}
    applied = apply_kernels(model, select_kernels("auto", "cpu", "bfloat16"))
    assert applied["lora_layers"] == 4 * model.config.num_hidden_layers
    reset()
    loss_and_grads(model, adapter, labelled_batch(model.config.vocab_size), select_kernels("auto", "cpu", "bfloat16"))
    assert calls("lora_compute_dtype") == 4 * model.config.num_hidden_layers
    assert calls("fused_linear_ce") == 1


def test_mixtral_fp32_auto_matches_eager():
    model, adapter = _lora_model("tiny-mixtral", torch.float32)
    batch = labelled_batch(model.config.vocab_size)
    ref_loss, ref_grads = loss_and_grads(model, adapter, batch)
    choice = select_kernels("auto", "cpu", "float32")
    apply_kernels(model, choice)
    loss, grads = loss_and_grads(model, adapter, batch, choice)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    for key, ref in ref_grads.items():
        torch.testing.assert_close(grads[key], ref, rtol=1e-4, atol=1e-6)


def test_bf16_casts_are_made_once_per_weight_version():
    """The bf16 copies of A and B serve every pass until the optimizer changes the weights; the gradients
    reaching the fp32 master weights are those of a plain cast."""
    model, _ = _lora_model("tiny-llama", torch.bfloat16)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, layer.in_features, dtype=torch.bfloat16)
    weight_a = layer.lora_A["default"].weight
    ref = layer(x)
    (ref_grad,) = torch.autograd.grad(ref.float().square().sum(), weight_a)
    use_compute_dtype_lora(model)
    reset()
    grads = []
    for _ in range(3):  # forward, recompute, next micro-batch: the same weights
        (grad,) = torch.autograd.grad(layer(x).float().square().sum(), weight_a)
        grads.append(grad)
    with torch.no_grad():
        layer(x)
    assert calls("lora_cast") == 2  # A and B, once
    assert all(g.dtype == torch.float32 and torch.equal(g, grads[0]) for g in grads)
    assert torch.nn.functional.cosine_similarity(grads[0].flatten(), ref_grad.flatten(), dim=0) > 0.99
    with torch.no_grad():
        weight_a.add_(1.0)  # what an optimizer step does: an in-place update
    reset()
    moved = layer(x)
    assert calls("lora_cast") == 1  # A again; B unchanged
    weight_b = layer.lora_B["default"].weight
    expected = layer.base_layer(x).float() + layer.scaling["default"] * (
        x.float() @ weight_a.to(torch.bfloat16).float().t() @ weight_b.to(torch.bfloat16).float().t())
    torch.testing.assert_close(moved.float(), expected, rtol=3e-2, atol=3e-2)
    # fused AdamW changes the weights without bumping their version counters: the step hook renews the copies
    weight_a.grad = torch.ones_like(weight_a)
    before = layer(x)
    reset()
    torch.optim.AdamW([weight_a], lr=0.5, fused=True).step()
    after = layer(x)
    assert calls("lora_cast") == 2 and not torch.equal(after, before)
    restore_stock_lora(model)
    assert "_streamtune_lora_casts" not in layer.__dict__
