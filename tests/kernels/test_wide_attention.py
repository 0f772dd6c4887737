"""Row-chunked GEMM attention for wide heads: equal to SDPA with the same mask, forward and backward (CPU, fp32),
and taken by the FlexAttention path for wide heads at long sequences."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamtune.kernels import calls, reset, select_kernels
from streamtune.kernels.wide_attention import chunk_rows, wide_attention, workspace_bytes


def _qkv(batch=2, heads=8, kv_heads=2, tokens=100, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, tokens, dim, generator=gen).requires_grad_()  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads), torch.randn(batch, heads, tokens, dim, generator=gen)


def _reference(q, k, v, grad, dense, scale):
    """SDPA in float64 with the kv heads repeated: output and the gradients of q, k, v."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reps = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q64, k64.repeat_interleave(reps, 1), v64.repeat_interleave(reps, 1), attn_mask=dense, scale=scale)
    out.backward(grad.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def _documents(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


def _check(q, k, v, grad, mask_mod, dense, scale, max_score_elements):
    ref = _reference(q, k, v, grad, dense, scale)
    out = wide_attention(q, k, v, mask_mod, scale, max_score_elements)
    out.backward(grad)
    for got, want in zip((out, q.grad, k.grad, v.grad), ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("max_score_elements", [8 * 16 * 100, 8 * 48 * 100, 2**30])
def test_equals_sdpa_with_gqa_packed_documents_and_any_chunking(max_score_elements):
    q, k, v, grad = _qkv()
    doc = _documents([40, 35, 25])

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & (doc[qi] == doc[ki])

    grid = torch.arange(100)
    dense = mask_mod(0, 0, grid[:, None], grid[None, :])
    _check(q, k, v, grad, mask_mod, dense, 0.3, max_score_elements)


def test_plain_causal_without_a_mask_function_and_the_default_scale():
    q, k, v, grad = _qkv(batch=1, heads=4, kv_heads=4, tokens=70, dim=32, seed=1)
    dense = torch.ones(70, 70, dtype=torch.bool).tril()
    _check(q, k, v, grad, None, dense, 32**-0.5, 4 * 16 * 70)
    assert wide_attention(q, k, v).shape == q.shape


def test_padding_per_sample_and_a_row_with_no_visible_key_gives_zeros():
    q, k, v, grad = _qkv(batch=2, heads=4, kv_heads=2, tokens=48, dim=16, seed=2)
    pad = torch.ones(2, 48, dtype=torch.bool)
    pad[1, :5] = False  # left padding: sample 1's first five rows see no key

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & pad[b, ki]

    out = wide_attention(q, k, v, mask_mod, 0.25, 4 * 16 * 48)
    out.backward(grad)
    assert torch.equal(out[1, :, :5], torch.zeros_like(out[1, :, :5]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # the rows that see keys equal the reference (with the empty rows' gradient held out of it)
    grid = torch.arange(48)
    dense = torch.stack([mask_mod(b, 0, grid[:, None], grid[None, :]) for b in range(2)])[:, None]
    dense[1, :, :5, 0] = True  # SDPA gives NaN for an empty row; the reference row is then discarded
    held = grad.clone()
    held[1, :, :5] = 0
    ref_out, ref_dq, ref_dk, ref_dv = _reference(q, k, v, held, dense, 0.25)
    q.grad = k.grad = v.grad = None
    out = wide_attention(q, k, v, mask_mod, 0.25, 4 * 16 * 48)
    out.backward(held)
    torch.testing.assert_close(out[:, :, 5:].double(), ref_out[:, :, 5:], rtol=1e-4, atol=2e-5)
    for got, want in zip((q.grad, k.grad, v.grad), (ref_dq, ref_dk, ref_dv)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)


def test_a_mask_function_written_for_vmap_only_is_evaluated_through_create_mask():
    q, k, v, grad = _qkv(batch=1, heads=2, kv_heads=1, tokens=40, dim=16, seed=3)

    def vmap_only(b, h, qi, ki):  # torch.stack needs equal shapes: scalars under vmap, not broadcast grids
        return torch.stack([qi, ki]).diff(dim=0)[0] <= 0

    with pytest.raises(RuntimeError):
        vmap_only(0, 0, torch.arange(4)[:, None], torch.arange(4)[None, :])
    dense = torch.ones(40, 40, dtype=torch.bool).tril()
    _check(q, k, v, grad, vmap_only, dense, 0.25, 2 * 16 * 40)


def test_chunks_are_bounded_by_the_score_limit_and_the_workspace_follows():
    assert chunk_rows(16, 8192, 128 * 2**20) == 1024
    assert chunk_rows(16, 2048, 64 * 2**20) == 2048
    assert chunk_rows(16, 10**6, 64 * 2**20) == 16  # never fewer than 16 rows
    assert workspace_bytes(16, 2, 8192, 512) > workspace_bytes(16, 2, 2048, 512) > 0


def test_mismatched_lengths_and_head_counts_are_refused():
    q = torch.randn(1, 3, 8, 4)
    with pytest.raises(ValueError, match="multiple"):
        wide_attention(q, torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))
    with pytest.raises(ValueError, match="KV cache"):
        wide_attention(q, torch.randn(1, 3, 9, 4), torch.randn(1, 3, 9, 4))


def test_selected_on_cuda_sm80_only():
    assert select_kernels("auto", "cuda", "bfloat16", (9, 0)).wide_attention_min_tokens
    assert select_kernels("auto", "cuda", "bfloat16", (8, 9)).wide_attention_min_tokens
    assert select_kernels("auto", "cuda", "bfloat16", (7, 5)).wide_attention_min_tokens is None
    assert select_kernels("auto", "cpu", "float32").wide_attention_min_tokens is None
    assert select_kernels("eager", "cuda", "bfloat16", (9, 0)).wide_attention_min_tokens is None


def test_tiny_gemma4_wide_layers_take_it_and_train_like_the_stock_model(monkeypatch):
    """The global layers (head_dim 32, counted wide here) go through it, the others through SDPA; loss and LoRA
    gradients equal the stock model's."""
    from streamtune.kernels import attention, select
    from tests.kernels.test_attention import _loss_and_grads, _lora_gemma

    monkeypatch.setattr(select, "WIDE_HEAD_DIM", 16)
    model, adapter, batch = _lora_gemma(96)
    ref_loss, ref_grads = _loss_and_grads(model, adapter, batch)
    choice = dataclasses.replace(select_kernels("auto", "cuda", "float32", (9, 0)), wide_attention_min_tokens=64)
    reset()
    attention.use_flex_attention(model, choice)
    loss, grads = _loss_and_grads(model, adapter, batch)
    wide_layers = sum(1 for c in model.config.get_text_config().per_layer_config if c.head_dim > 16)
    assert calls("wide_attention") == wide_layers > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for key, ref in ref_grads.items():
        torch.testing.assert_close(grads[key], ref, rtol=1e-4, atol=1e-5)


def test_an_elementwise_kernel_that_cannot_compile_runs_eagerly_with_a_warning(monkeypatch):
    from streamtune.kernels import compiling, wide_attention

    def broken(*args):
        raise RuntimeError("no Triton for this card")

    monkeypatch.setattr(compiling, "compile_fn", lambda fn, dynamic: broken)
    monkeypatch.setattr(wide_attention, "_COMPILED", {})
    monkeypatch.setattr(wide_attention, "FALLBACK", compiling.CompileFallback("wide", "eager"))
    fn = wide_attention._elementwise("softmax", wide_attention._softmax_rows, "cuda")
    scores, keep = torch.randn(1, 1, 2, 4, 6), torch.ones(1, 1, 1, 4, 6, dtype=torch.bool)
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        probs, lse = fn(scores, keep, 0.5, torch.float32)
    torch.testing.assert_close(probs, torch.softmax(scores * 0.5, -1))
    assert wide_attention._elementwise("softmax", wide_attention._softmax_rows, "cuda") is wide_attention._softmax_rows
