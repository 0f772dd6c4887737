"""Chunked LM-head loss equals the model's own loss and gradients, in bounded chunks."""

from __future__ import annotations

import pytest
import torch

from streamtune.config import LoraConfig
from streamtune.lora import attach_lora
from streamtune.models.build import build_model
from streamtune.train.loss import (
    LOSS_POSITIONS_KEY, chunked_lm_loss_sum, count_valid_tokens, lm_loss_sum, loss_positions, shift_labels,
)
from streamtune.train.support import to_device


def _batch(vocab: int, seed: int = 0, batch: int = 2, seq: int = 24):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 10:13] = -100
    return {"input_ids": ids, "labels": labels}


@pytest.fixture(scope="module", params=["tiny-gemma4", "tiny-llama"])
def lora_model(request):
    model, adapter = build_model(request.param, torch.float32, seed=1)
    model = attach_lora(model, adapter, LoraConfig(rank=4, alpha=8), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, adapter


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_loss_matches_model_loss(lora_model, chunk_tokens):
    model, adapter = lora_model
    batch = _batch(model.config.vocab_size)
    expected = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    total = lm_loss_sum(model, adapter, batch, chunk_tokens)
    got = total / count_valid_tokens(batch["labels"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_loss_positions_come_with_the_batch_and_are_used(lora_model):
    model, adapter = lora_model
    batch = _batch(model.config.vocab_size, seed=5)
    moved = to_device(batch, "cpu")
    positions = moved[LOSS_POSITIONS_KEY]
    flat = shift_labels(batch["labels"]).reshape(-1)
    assert positions.tolist() == [i for i, t in enumerate(flat.tolist()) if t != -100]
    assert positions.numel() == count_valid_tokens(batch["labels"])
    with torch.no_grad():
        torch.testing.assert_close(lm_loss_sum(model, adapter, moved, 7), lm_loss_sum(model, adapter, batch, 7),
                                   rtol=1e-6, atol=1e-6)
        # the given positions are the ones summed: three of them give those three tokens' losses
        some = {**moved, LOSS_POSITIONS_KEY: positions[:3]}
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits.reshape(-1, model.config.vocab_size)
        expected = torch.nn.functional.cross_entropy(logits[positions[:3]].float(), flat[positions[:3]],
                                                     reduction="sum")
        torch.testing.assert_close(lm_loss_sum(model, adapter, some, 7), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(loss_positions(batch["labels"]), positions)


def test_gradients_match_model_loss(lora_model):
    model, adapter = lora_model
    batch = _batch(model.config.vocab_size, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    (lm_loss_sum(model, adapter, batch, 5) / count_valid_tokens(batch["labels"])).backward()
    for p, ref in zip(params, expected):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_gemma4_softcap_is_applied():
    model, adapter = build_model("tiny-gemma4", torch.float32, seed=1)
    assert adapter.logit_softcap(model.config) == 30.0
    hidden = torch.randn(1, 6, 8) * 50
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (1, 6))
    capped = chunked_lm_loss_sum(hidden, labels, head, 30.0, 4)
    logits = head(hidden[0, :-1])
    ref = torch.nn.functional.cross_entropy(torch.tanh(logits / 30.0) * 30.0, labels[0, 1:], reduction="sum")
    torch.testing.assert_close(capped, ref)
    assert not torch.allclose(chunked_lm_loss_sum(hidden, labels, head, None, 4), ref)


def test_logits_never_exceed_one_chunk():
    shapes = []

    class Head(torch.nn.Linear):
        def forward(self, x):
            out = super().forward(x)
            shapes.append(tuple(out.shape))
            return out

    head = Head(16, 50, bias=False)
    hidden = torch.randn(3, 40, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 40))
    labels[:, ::3] = -100
    total = chunked_lm_loss_sum(hidden, labels, head, None, chunk_tokens=8)
    total.backward()
    assert shapes and max(s[0] for s in shapes) <= 8
    valid = count_valid_tokens(labels)
    assert sum(s[0] for s in shapes) == 2 * valid  # forward + recomputation in the backward
    full = torch.nn.functional.cross_entropy(
        head(hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(total, full)


def test_no_valid_tokens_gives_zero_with_grad_path():
    head = torch.nn.Linear(4, 9, bias=False)
    hidden = torch.randn(1, 5, 4, requires_grad=True)
    labels = torch.full((1, 5), -100)
    total = chunked_lm_loss_sum(hidden, labels, head, None, 2)
    assert float(total.detach()) == 0.0
    total.backward()
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) == 0.0
    assert count_valid_tokens(labels) == 0


def test_batch_loss_tokens_counts_from_the_positions_when_the_batch_carries_them():
    from streamtune.train.loss import batch_loss_tokens, count_valid_tokens
    from streamtune.train.support import to_device

    labels = torch.tensor([[5, -100, 7, 8], [-100, -100, 3, -100]])
    moved = to_device({"input_ids": labels.clamp(min=0), "labels": labels}, "cpu")
    assert "loss_positions" in moved
    assert batch_loss_tokens(moved) == batch_loss_tokens({"labels": labels}) == count_valid_tokens(labels) == 3
