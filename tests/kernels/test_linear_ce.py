"""The fused linear + soft-capped cross-entropy equals the stock chunked loss (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from streamtune.kernels import calls, reset, select_kernels
from streamtune.kernels.linear_ce import linear_softcap_ce_sum, softcap_ce_rows
from streamtune.train.loss import chunked_lm_loss_sum


def _reference(hidden, weight, targets, softcap):
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 30.0, 2.0])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 64])
def test_loss_and_gradients_match_autograd(softcap, chunk_tokens):
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(13, 16, generator=gen) * 3).requires_grad_()
    weight = torch.randn(40, 16, generator=gen).requires_grad_()
    targets = torch.randint(0, 40, (13,), generator=gen)
    ref = _reference(hidden, weight, targets, softcap)
    ref_h, ref_w = torch.autograd.grad(ref * 0.37, (hidden, weight))
    got = linear_softcap_ce_sum(hidden, weight, targets, softcap, chunk_tokens)
    got_h, got_w = torch.autograd.grad(got * 0.37, (hidden, weight))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_skips_it():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    targets = torch.randint(0, 20, (6,))
    loss = linear_softcap_ce_sum(hidden, weight, targets, 30.0, 4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        assert not linear_softcap_ce_sum(hidden, weight, targets, 30.0, 4).requires_grad
    loss_only, grad = softcap_ce_rows(hidden.detach() @ weight.t(), targets, 30.0, with_grad=False)
    assert grad is None
    torch.testing.assert_close(loss_only, _reference(hidden.detach(), weight, targets, 30.0))


def test_chunked_loss_takes_the_fused_path_and_matches_the_stock_one():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, 8, generator=gen, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=False)
    labels = torch.randint(0, 30, (2, 9), generator=gen)
    labels[1, :4] = -100
    stock = chunked_lm_loss_sum(hidden, labels, head, 30.0, 4)
    (stock_grad,) = torch.autograd.grad(stock, hidden)
    reset()
    fused = chunked_lm_loss_sum(hidden, labels, head, 30.0, 4, select_kernels("auto", "cpu", "float32"))
    assert calls("fused_linear_ce") == 1
    (fused_grad,) = torch.autograd.grad(fused, hidden)
    torch.testing.assert_close(fused, stock, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(fused_grad, stock_grad, rtol=1e-5, atol=1e-6)
    reset()
    chunked_lm_loss_sum(hidden, labels, head, 30.0, 4, select_kernels("eager", "cpu"))
    assert calls("fused_linear_ce") == 0


def test_bf16_loss_is_close_to_fp32():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(32, 64, generator=gen)
    weight = torch.randn(500, 64, generator=gen) * 0.2
    targets = torch.randint(0, 500, (32,), generator=gen)
    ref = _reference(hidden, weight, targets, 30.0)
    got = linear_softcap_ce_sum(hidden.bfloat16(), weight.bfloat16(), targets, 30.0, 8)
    assert got.dtype == torch.float32
    assert abs(float(got) - float(ref)) / float(ref) < 1e-2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        linear_softcap_ce_sum(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), None, 0)
    with pytest.raises(ValueError, match=r"\[n, H\]"):
        linear_softcap_ce_sum(torch.randn(2, 4), torch.randn(5, 3), torch.zeros(2, dtype=torch.long), None, 1)
