"""Row-chunked GEMM attention on CUDA in bf16 (fp32 GEMM outputs, compiled elementwise kernels): as close to an
fp32 reference as SDPA's memory-efficient kernel, at Gemma4's global-layer shape cut to 1024 tokens."""

from __future__ import annotations

import pytest
import torch

from streamtune.kernels.wide_attention import wide_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _errors(out, grads, ref_out, ref_grads):
    return [float((a.float() - b).abs().max()) for a, b in zip((out, *grads), (ref_out, *ref_grads))]


def test_bf16_wide_attention_is_as_close_to_fp32_as_memory_efficient_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    tokens, dim = 1024, 512
    q = torch.randn(1, 16, tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(q)
    doc = torch.cat([torch.zeros(600, dtype=torch.long), torch.ones(424, dtype=torch.long)]).cuda()

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & (doc[qi] == doc[ki])

    grid = torch.arange(tokens, device="cuda")
    dense = mask_mod(0, 0, grid[:, None], grid[None, :])
    scale = dim**-0.5

    def sdpa(qq, kk, vv):
        return torch.nn.functional.scaled_dot_product_attention(
            qq, kk.repeat_interleave(8, 1), vv.repeat_interleave(8, 1), attn_mask=dense, scale=scale)

    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.MATH]):
        ref = sdpa(*leaves)
    ref.backward(grad.float())
    ref_grads = [t.grad for t in leaves]
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        base = sdpa(q, k, v)
    base_grads = torch.autograd.grad(base, (q, k, v), grad)
    ours = wide_attention(q, k, v, mask_mod, scale, max_score_elements=16 * 128 * tokens)  # 8 chunks
    our_grads = torch.autograd.grad(ours, (q, k, v), grad)
    ours_err, base_err = _errors(ours, our_grads, ref, ref_grads), _errors(base, base_grads, ref, ref_grads)
    for name, mine, theirs in zip(("out", "dq", "dk", "dv"), ours_err, base_err):
        assert mine <= 1.5 * theirs + 1e-3, (name, ours_err, base_err)


@pytest.mark.parametrize("compiled", [False, True], ids=["pieces", "compiled-layers"])
def test_tiny_gemma4_global_layers_through_wide_attention_match_eager_on_cuda(monkeypatch, compiled):
    """fp32, the global layers (head_dim 32 here, counted wide) through the row-chunked GEMMs inside the fast path
    (and inside compiled layers, where attention is a graph break): loss and LoRA gradients equal the eager ones."""
    import dataclasses

    from streamtune.kernels import apply_kernels, calls, reset, select, select_for_device
    from streamtune.train.loss import count_valid_tokens, lm_loss_sum
    from tests.kernels.steps import lora_model

    monkeypatch.setattr(select, "WIDE_HEAD_DIM", 16)
    model, adapter = lora_model("tiny-gemma4", "cuda")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 512), generator=gen)
    positions = torch.cat([torch.arange(300), torch.arange(212)])[None]
    batch = {k: v.cuda() for k, v in {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}.items()}

    def loss_and_grads(kernels):
        model.zero_grad(set_to_none=True)
        loss = lm_loss_sum(model, adapter, batch, 128, kernels) / count_valid_tokens(batch["labels"])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads(None)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        choice = dataclasses.replace(select_for_device("auto", torch.device("cuda"), torch.float32,
                                                       compile_layers=compiled), wide_attention_min_tokens=256)
        apply_kernels(model, choice)
        reset()
        loss, grads = loss_and_grads(choice)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    assert calls("wide_attention") > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    for key, ref in ref_grads.items():
        cosine = torch.nn.functional.cosine_similarity(grads[key].flatten(), ref.flatten(), dim=0)
        assert cosine > 0.999, key
