"""FlexAttention path: its block masks equal the stock masks, and its outputs the stock model's (CPU, fp32).

FlexAttention has no backward on the CPU (torch 2.13), so these tests run forward only; the
kernel's backward is checked on the GPU by benchmarks/fast_step.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from streamtune.config import LoraConfig
from streamtune.kernels import apply_kernels, calls, reset, select_kernels
from streamtune.kernels.attention import FLEX_NAME, register_flex, restore_attention, use_flex_attention
from streamtune.lora import attach_lora
from streamtune.models.build import build_model
from streamtune.train.loss import lm_loss_sum

SEQ = 384


def _packed_positions(lengths, batch=2):
    return torch.cat([torch.arange(n) for n in lengths]).repeat(batch, 1)


def _masks(config, position_ids, attention_mask=None):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    embeds = torch.zeros(position_ids.shape[0], position_ids.shape[1], config.hidden_size)
    return {
        "full": create_causal_mask(config, embeds, attention_mask, None, position_ids=position_ids),
        "sliding": create_sliding_window_causal_mask(config, embeds, attention_mask, None, position_ids=position_ids),
    }


def _dense_from_block_mask(block_mask, batch, length):
    grid = torch.arange(length)
    rows = []
    for b in range(batch):
        q, kv = grid[:, None], grid[None, :]
        rows.append(block_mask.mask_mod(torch.tensor(b), torch.tensor(0), q, kv))
    return torch.stack(rows)[:, None]


@pytest.mark.parametrize("padded", [False, True])
def test_block_masks_equal_the_stock_masks_and_skip_blocks_outside_the_window(padded):
    model, _ = build_model("tiny-gemma4", torch.float32, seed=1)
    register_flex()
    positions = _packed_positions([100, 200, 84])
    padding = None
    if padded:
        positions = torch.arange(SEQ).repeat(2, 1)
        padding = torch.ones(2, SEQ, dtype=torch.long)
        padding[1, 300:] = 0
    stock_cfg, flex_cfg = copy.deepcopy(model.config), copy.deepcopy(model.config)
    stock_cfg._attn_implementation, flex_cfg._attn_implementation = "sdpa", FLEX_NAME
    stock, flex = _masks(stock_cfg, positions, padding), _masks(flex_cfg, positions, padding)
    for kind in ("full", "sliding"):
        dense = _dense_from_block_mask(flex[kind], 2, SEQ)
        expected = stock[kind].expand(2, 1, SEQ, SEQ)
        if padded:  # fully padded query rows: the stock mask may let them attend anywhere; no loss there
            dense, expected = dense[:, :, :300], expected[:, :, :300]
        assert torch.equal(dense, expected), kind
        blocks = flex[kind].to_dense()[:, 0].bool()  # [B, q_blocks, kv_blocks]
        size = flex[kind].BLOCK_SIZE[0]
        covered = blocks.repeat_interleave(size, 1).repeat_interleave(size, 2)[:, :SEQ, :SEQ]
        assert not (dense[:, 0] & ~covered[: dense.shape[0], : dense.shape[2]]).any(), "a live element in a skipped block"
    window_blocks = flex["sliding"].to_dense().sum()
    full_blocks = flex["full"].to_dense().sum()
    assert window_blocks < full_blocks or padded


# on the CPU FlexAttention runs uncompiled (the reference math; the test is about taking the path, not speed)
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_model_forward_equals_stock_forward_and_is_taken():
    model, adapter = build_model("tiny-gemma4", torch.float32, seed=1)
    model = attach_lora(model, adapter, LoraConfig(rank=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1024, (2, 160), generator=gen)  # > one 128-token block: the FlexAttention kernel runs
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": _packed_positions([100, 60])}
    with torch.no_grad():
        stock = lm_loss_sum(model, adapter, batch, 128)
        reset()
        previous = use_flex_attention(model, select_kernels("auto", "cuda", "float32", (9, 0)))
        flex = lm_loss_sum(model, adapter, batch, 128)
        assert calls("flex_attention") == model.config.num_hidden_layers
        assert calls("flex_dense_fallback") == 0
        restore_attention(model, previous)
    assert model.config._attn_implementation == previous
    torch.testing.assert_close(flex, stock, rtol=1e-5, atol=1e-4)


def test_flex_is_applied_only_where_selected():
    model, adapter = build_model("tiny-llama", torch.float32, seed=1)
    model = attach_lora(model, adapter, LoraConfig(rank=2), seed=0)
    assert apply_kernels(model, select_kernels("auto", "cpu", "float32"))["attention"] is None
    assert model.config._attn_implementation != FLEX_NAME
    choice = select_kernels("auto", "cuda", "bfloat16", (9, 0))
    assert apply_kernels(model, choice)["attention"] == FLEX_NAME
    assert model.config._attn_implementation == FLEX_NAME


def test_dense_mask_and_dropout_are_refused():
    from streamtune.kernels.attention import flex_attention_forward

    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="BlockMask"):
        flex_attention_forward(None, q, q, q, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout"):
        flex_attention_forward(None, q, q, q, None, dropout=0.1)


def _lora_gemma(seq):
    model, adapter = build_model("tiny-gemma4", torch.float32, seed=1)
    model = attach_lora(model, adapter, LoraConfig(rank=4, alpha=8), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1024, (2, seq), generator=gen)
    positions = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)]).repeat(2, 1)
    return model, adapter, {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}


def _loss_and_grads(model, adapter, batch):
    model.zero_grad(set_to_none=True)
    loss = lm_loss_sum(model, adapter, batch, 32)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_short_sequences_use_dense_sdpa_with_the_block_masks_and_train():
    model, adapter, batch = _lora_gemma(64)
    ref_loss, ref_grads = _loss_and_grads(model, adapter, batch)
    reset()
    use_flex_attention(model, select_kernels("auto", "cuda", "float32", (9, 0)))
    loss, grads = _loss_and_grads(model, adapter, batch)
    layers = model.config.num_hidden_layers
    assert calls("flex_attention") == calls("flex_dense_fallback") == layers
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for key, ref in ref_grads.items():
        torch.testing.assert_close(grads[key], ref, rtol=1e-4, atol=1e-5)


def test_a_kernel_that_cannot_compile_falls_back_to_dense_with_a_warning(monkeypatch):
    from streamtune.kernels import attention

    def broken(device_type):
        def kernel(*args, **kwargs):
            raise RuntimeError("no valid choices")
        return kernel

    model, adapter, batch = _lora_gemma(SEQ)
    with torch.no_grad():
        ref = lm_loss_sum(model, adapter, batch, 128)
        use_flex_attention(model, select_kernels("auto", "cuda", "float32", (9, 0)))
        monkeypatch.setattr(attention, "_flex_kernel", broken)
        reset()
        with pytest.warns(RuntimeWarning, match="falls back to SDPA"):
            got = lm_loss_sum(model, adapter, batch, 128)
    assert calls("flex_dense_fallback") == model.config.num_hidden_layers
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    use_flex_attention(model, select_kernels("auto", "cuda", "float32", (9, 0)))
    assert not attention.FALLBACK.broken


def test_attention_is_a_graph_break_inside_a_compiled_layer():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    register_flex()
    attend = ALL_ATTENTION_FUNCTIONS[FLEX_NAME]
    q = torch.randn(1, 2, 16, 8)

    def layer(query, key, value):  # what a compiled decoder layer does around its attention call
        out, _ = attend(None, query * 2.0, key, value, None, scaling=0.5)
        return out.float() + 1.0

    explanation = torch._dynamo.explain(layer)(q, q, q)
    assert explanation.graph_break_count == 1
    reset()
    eager = layer(q, q, q)
    assert calls("flex_attention") == 1
    torch.testing.assert_close(torch.compile(layer, backend="eager")(q, q, q), eager)
