"""Fused RMSNorm and gated activation: same numbers as the stock modules, compiled once for all layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamtune.kernels import apply_kernels, calls, reset, select_kernels
from streamtune.kernels import fused
from streamtune.kernels.compiling import CompileFallback
from streamtune.kernels.fused import (fused_norm_forward, norm_convention, restore_stock_norms_and_activation,
                                      use_fused_activation, use_fused_norms)


def _gemma4_norm(dim, with_scale=True):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    norm = Gemma4RMSNorm(dim, eps=1e-6, with_scale=with_scale)
    if with_scale:
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(dim))
    return norm


def _llama_norm(dim):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(dim))
    return norm


class OnePlusWeightNorm(torch.nn.Module):
    """Gemma 1-3's convention: ``x_hat * (1 + w)``, weight initialised at zero."""

    def __init__(self, dim):
        super().__init__()
        self.eps = 1e-6
        self.weight = torch.nn.Parameter(torch.randn(dim, generator=torch.Generator().manual_seed(1)) * 0.1)

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())).type_as(x)


def _stock_vs_fused(module, x):
    """(stock output, stock grads), (fused output, fused grads) for ``sum(out * r)``."""
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for forward in (type(module).forward, fused_norm_forward):
        inp = x.clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        out = forward(module, inp)
        (out * r).sum().backward()
        params = [p.grad.clone() for p in module.parameters()]
        results.append((out.detach(), inp.grad.clone(), params))
    return results


def test_norm_conventions_are_probed_from_the_class_forward():
    assert norm_convention(_gemma4_norm(8)) == 0.0
    assert norm_convention(_gemma4_norm(8, with_scale=False)) == 0.0
    assert norm_convention(_llama_norm(8)) == 0.0
    assert norm_convention(OnePlusWeightNorm(8)) == 1.0


def test_compiled_fused_norms_and_activation_equal_stock_and_compile_a_bounded_number_of_times():
    """30 layers of different weights and two lengths: one compile per (function, grad mode), not per layer."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    reset()
    modules = [_gemma4_norm(32) for _ in range(30)] + [_gemma4_norm(16, with_scale=False), OnePlusWeightNorm(32)]
    for i, module in enumerate(modules):
        module._streamtune_norm_offset = norm_convention(module)
        for tokens in (5, 9):
            x = torch.randn(2, tokens, module.weight.shape[0] if hasattr(module, "weight") else 16,
                            generator=torch.Generator().manual_seed(i))
            (out, grad_x, grads), (f_out, f_grad_x, f_grads) = _stock_vs_fused(module, x)
            torch.testing.assert_close(f_out, out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(f_grad_x, grad_x, rtol=1e-5, atol=1e-5)
            for got, ref in zip(f_grads, grads):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(3)
    for act, stock in (("gelu_tanh_mul", lambda g: torch.nn.functional.gelu(g, approximate="tanh")),
                       ("silu_mul", torch.nn.functional.silu)):
        for tokens in (7, 11):
            gate, up = (torch.randn(tokens, 24, generator=gen).requires_grad_() for _ in range(2))
            f_gate, f_up = (t.detach().clone().requires_grad_() for t in (gate, up))
            (stock(gate) * up).square().sum().backward()
            fused.run_fused(act, f_gate, f_up).square().sum().backward()
            torch.testing.assert_close(f_gate.grad, gate.grad, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(f_up.grad, up.grad, rtol=1e-5, atol=1e-5)
    assert not fused.FALLBACK.broken
    assert calls("rms_norm_scaled") == 2 * 31 and calls("rms_norm_plain") == 2 and calls("gelu_tanh_mul") == 2
    assert calls("fused_compiled") == calls("rms_norm_scaled") + calls("rms_norm_plain") + 4
    # scaled (with/without offset folded as an input), plain, two activations; a few specialisations at most
    assert counters["stats"]["unique_graphs"] <= 8, dict(counters["stats"])


def test_compile_failure_warns_once_and_runs_uncompiled(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused, "_STATE", {"compiled": {}})
    monkeypatch.setattr(fused, "FALLBACK", CompileFallback("fused norms/activations", "uncompiled"))
    monkeypatch.setattr(torch, "compile", broken)
    norm = _gemma4_norm(8)
    norm._streamtune_norm_offset = 0.0
    x = torch.randn(3, 8)
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        out = fused_norm_forward(norm, x)
    torch.testing.assert_close(out, type(norm).forward(norm, x), rtol=1e-6, atol=1e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_norm_forward(norm, x)
    assert fused.FALLBACK.broken


def test_apply_patches_every_gemma4_norm_and_mlp_only_when_selected():
    from streamtune.models.build import build_model

    model, _ = build_model("tiny-gemma4", torch.float32, seed=1)
    assert "fused_norms" not in apply_kernels(model, select_kernels("auto", "cpu", "float32"))
    choice = dataclasses.replace(select_kernels("auto", "cpu", "float32"), fused_norm_act=True)
    applied = apply_kernels(model, choice)
    num_norms = sum(type(m).__name__ == "Gemma4RMSNorm" for m in model.modules())
    assert applied["fused_norms"] == num_norms > 0
    assert applied["fused_activations"] == model.config.num_hidden_layers
    restore_stock_norms_and_activation(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert use_fused_norms(model) == num_norms and use_fused_activation(model) == model.config.num_hidden_layers
