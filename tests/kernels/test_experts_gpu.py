"""Expert LoRA on CUDA: bf16 auto vs eager through grouped_mm, no host sync in the routed forward/backward."""

from __future__ import annotations

import pytest
import torch

from streamtune.config import LoraConfig
from streamtune.kernels import apply_kernels, calls, reset, select_for_device
from streamtune.lora import attach_lora
from streamtune.models.build import build_model
from streamtune.train.loss import count_valid_tokens, lm_loss_sum

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def _model():
    model, adapter = build_model("tiny-gemma4", torch.bfloat16, seed=1)
    model = attach_lora(model, adapter, LoraConfig(rank=4, alpha=8, targets=["q_proj"],
                                                   target_parameters=EXPERT_PARAMS), seed=0).cuda()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, adapter


def _loss_and_grads(model, adapter, batch, kernels):
    model.zero_grad(set_to_none=True)
    loss = lm_loss_sum(model, adapter, batch, 64, kernels) / count_valid_tokens(batch["labels"])
    loss.backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_bf16_close(loss, ref_loss, grads, ref_grads):
    """Loss within 1 % and every LoRA gradient at cosine > 0.99 (bf16 against the stock path)."""
    assert abs(float(loss) - float(ref_loss)) / float(ref_loss) < 1e-2
    for key, ref in ref_grads.items():
        cosine = torch.nn.functional.cosine_similarity(grads[key].flatten().float(), ref.flatten().float(), dim=0)
        assert cosine > 0.99, key


def test_bf16_auto_matches_eager_through_grouped_mm():
    model, adapter = _model()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 256), generator=gen).cuda()
    batch = {"input_ids": ids, "labels": ids.clone()}
    ref_loss, ref_grads = _loss_and_grads(model, adapter, batch, None)
    choice = select_for_device("auto", torch.device("cuda"), torch.bfloat16)
    assert choice.expert_lora == "grouped_mm"
    assert apply_kernels(model, choice)["expert_lora_modules"] == model.config.num_hidden_layers
    reset()
    loss, grads = _loss_and_grads(model, adapter, batch, choice)
    assert calls("expert_lora_grouped_mm") == model.config.num_hidden_layers and calls("expert_lora_loop") == 0
    _assert_bf16_close(loss, ref_loss, grads, ref_grads)


def test_grouped_route_makes_no_host_sync():
    model, _ = _model()
    apply_kernels(model, select_for_device("auto", torch.device("cuda"), torch.bfloat16))
    experts = model.base_model.model.model.layers[0].experts
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, model.config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)
    x.requires_grad_()
    index = torch.randint(0, model.config.num_experts, (512, 2), device="cuda", generator=gen)
    weights = torch.rand(512, 2, device="cuda", generator=gen)
    experts(x, index, weights).float().square().mean().backward()  # warm-up (lazy inits may sync)
    torch.cuda.synchronize()
    reset()
    torch.cuda.set_sync_debug_mode("error")
    try:
        experts(x, index, weights).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls("expert_lora_grouped_mm") == 1


def test_bf16_fast_experts_match_the_stock_experts_and_make_no_host_sync():
    import dataclasses

    model, adapter = build_model("tiny-gemma4", torch.bfloat16, seed=1)
    model = attach_lora(model, adapter, LoraConfig(rank=4, alpha=8, targets=["q_proj"]), seed=0).cuda()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 256), generator=gen).cuda()
    batch = {"input_ids": ids, "labels": ids.clone()}
    ref_loss, ref_grads = _loss_and_grads(model, adapter, batch, None)
    choice = dataclasses.replace(select_for_device("auto", torch.device("cuda"), torch.bfloat16), fast_experts=True)
    assert apply_kernels(model, choice)["fast_experts_modules"] == model.config.num_hidden_layers
    _loss_and_grads(model, adapter, batch, choice)  # warm-up: compiles the combine
    reset()
    loss, grads = _loss_and_grads(model, adapter, batch, choice)
    assert calls("fast_experts_grouped_mm") == model.config.num_hidden_layers and calls("fast_experts_loop") == 0
    _assert_bf16_close(loss, ref_loss, grads, ref_grads)
    experts = model.base_model.model.model.layers[0].experts
    x = torch.randn(512, model.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    index = torch.randint(0, model.config.num_experts, (512, 2), device="cuda")
    weights = torch.rand(512, 2, device="cuda")
    experts(x, index, weights).float().square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        experts(x, index, weights).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
