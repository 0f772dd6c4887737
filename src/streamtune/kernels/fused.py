"""Fused RMSNorm and gated MLP activation: one compiled kernel each, shared by every layer.

The stock norms run as separate fp32 ops (cast up, square, mean, pow, scale, cast down) and the
gated MLP as ``act(gate)`` then ``* up``; with HF gradient checkpointing each runs three times a
step. Here each is a small pure function compiled once per process with ``torch.compile``
(Inductor generates one fused kernel for the forward and one for the backward on CUDA; a C++ loop
on the CPU). The functions take the weights as arguments and are compiled with dynamic shapes, so
layers of different weights and sizes share the compiled code: the number of compiles is bounded
by (function, dtype, grad mode), not by layers or sequence lengths.

Numbers: the norm accumulates in fp32 and rounds once to the input dtype, as Gemma's norm does.
Norms that round before scaling (Llama, Qwen: ``weight * x_hat.to(bf16)``) differ from this by one
bf16 rounding of the product; in fp32 they are the same. Which weight convention a norm class uses
(``x_hat * w`` or ``x_hat * (1 + w)``) is found by running the class's own forward on a probe, and
a class matching neither keeps its stock forward.

If compilation fails (no C++ compiler, an Inductor error) a warning is given once and the same
functions run uncompiled from then on. Imported lazily: it imports torch.
"""

from __future__ import annotations

import copy
import functools
import types
from typing import Any, Callable

import torch

from streamtune.kernels.binding import unbind_forwards
from streamtune.kernels.compiling import CompileFallback
from streamtune.kernels.counters import count

_STATE: dict[str, Any] = {"compiled": {}}
FALLBACK = CompileFallback("fused norms/activations", "they run uncompiled (train.kernels=eager silences this)")
_CONVENTIONS: dict[type, float | None] = {}
_NORM_FLAG = "_streamtune_fused_norm"
_ACT_FLAG = "_streamtune_fused_act"
# transformers ``hidden_activation`` / ``hidden_act`` names -> the fused function's name
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh_mul", "gelu_tanh": "gelu_tanh_mul", "silu": "silu_mul",
               "swish": "silu_mul"}


def rms_norm_scaled(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * (weight + offset)`` over the last dim, fp32 inside, ``x.dtype`` out."""
    xf = x.float()
    normed = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return (normed * (weight.float() + offset)).to(x.dtype)


def rms_norm_plain(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dim (norms without a scale), fp32 inside."""
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)).to(x.dtype)


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (Gemma's gated MLP)."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Llama, Qwen, Mixtral)."""
    return torch.nn.functional.silu(gate) * up


_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "rms_norm_scaled": rms_norm_scaled, "rms_norm_plain": rms_norm_plain,
    "gelu_tanh_mul": gelu_tanh_mul, "silu_mul": silu_mul,
}


def compiled(name: str) -> Callable[..., torch.Tensor]:
    """The process-wide compiled form of the function ``name`` (created on first use)."""
    table = _STATE["compiled"]
    if name not in table:
        from streamtune.kernels.compiling import compile_fn

        # the recompile limit and float specialisation it sets: see kernels.compiling
        table[name] = compile_fn(_FUNCTIONS[name], dynamic=True)
    return table[name]


def run_fused(name: str, *args: Any) -> torch.Tensor:
    """Call the compiled ``name``; on a compile failure warn once and run it uncompiled from now on."""
    if torch.compiler.is_compiling():  # inside a compiled layer: traced into the layer's graph
        return _FUNCTIONS[name](*args)
    count(name)
    return FALLBACK.run(functools.partial(_run_compiled, name), _FUNCTIONS[name], *args)


def _run_compiled(name: str, *args: Any) -> torch.Tensor:
    out = compiled(name)(*args)
    count("fused_compiled")
    return out


def fused_norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """RMSNorm forward through the compiled kernel (bound per module by :func:`use_fused_norms`)."""
    eps = float(getattr(self, "eps", getattr(self, "variance_epsilon", 1e-6)))
    weight = getattr(self, "weight", None) if getattr(self, "with_scale", True) else None
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # one rank for every caller: fewer graphs
    if weight is None:
        out = run_fused("rms_norm_plain", rows, eps)
    else:
        out = run_fused("rms_norm_scaled", rows, weight, eps, self._streamtune_norm_offset)
    return out.view(hidden_states.shape)


def fused_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Gated MLP forward ``down(act(gate(x)) * up(x))`` with the fused activation (bound per module)."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    fused = run_fused(self._streamtune_act, gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]))
    return self.down_proj(fused.view(gate.shape))


def norm_convention(module: Any) -> float | None:
    """The weight offset of ``module``'s class (0.0: ``x_hat * w``; 1.0: ``x_hat * (1 + w)``), None if neither.

    Found once per class by running its own forward on a CPU fp32 probe with random weights.
    """
    cls = type(module)
    if cls in _CONVENTIONS:
        return _CONVENTIONS[cls]
    _CONVENTIONS[cls] = _probe_convention(module)
    return _CONVENTIONS[cls]


def _probe_convention(module: Any) -> float | None:
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if not isinstance(eps, float):
        return None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=gen)
    probe = copy.copy(module)
    probe._parameters = {}
    probe._buffers = {}
    has_weight = isinstance(getattr(module, "weight", None), torch.Tensor) and getattr(module, "with_scale", True)
    if has_weight:
        probe._parameters["weight"] = torch.nn.Parameter(torch.randn(8, generator=gen), requires_grad=False)
    try:
        with torch.no_grad():
            stock = type(module).forward(probe, x)
    except Exception:  # a norm whose forward needs more than ``x`` is left alone
        return None
    if not has_weight:
        return 0.0 if torch.allclose(stock, rms_norm_plain(x, eps), rtol=1e-5, atol=1e-6) else None
    for offset in (0.0, 1.0):
        if torch.allclose(stock, rms_norm_scaled(x, probe.weight, eps, offset), rtol=1e-5, atol=1e-6):
            return offset
    return None


def _is_rms_norm(module: Any) -> bool:
    return type(module).__name__.endswith("RMSNorm") and type(module).forward is not torch.nn.Module.forward


def use_fused_norms(model: Any) -> int:
    """Bind :func:`fused_norm_forward` to every RMSNorm of ``model`` whose convention the probe recognises.

    Returns:
        The number of norm modules patched.
    """
    patched = 0
    for module in model.modules():
        if not _is_rms_norm(module) or getattr(module, _NORM_FLAG, False):
            continue
        offset = norm_convention(module)
        if offset is None:
            continue
        module._streamtune_norm_offset = offset
        module.forward = types.MethodType(fused_norm_forward, module)
        setattr(module, _NORM_FLAG, True)
        patched += 1
    return patched


def _activation_name(module: Any) -> str | None:
    config = getattr(module, "config", None)
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return ACTIVATIONS.get(name) if isinstance(name, str) else None


def use_fused_activation(model: Any) -> int:
    """Bind :func:`fused_mlp_forward` to every gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``).

    Only MLPs whose config names an activation of :data:`ACTIVATIONS` and whose class forward is
    the plain ``down(act(gate(x)) * up(x))`` (checked on a probe) are patched.

    Returns:
        The number of MLP modules patched.
    """
    patched = 0
    for module in model.modules():
        if getattr(module, _ACT_FLAG, False) or not all(
                hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        name = _activation_name(module)
        if name is None or not _plain_gated_mlp(module, name):
            continue
        module._streamtune_act = name
        module.forward = types.MethodType(fused_mlp_forward, module)
        setattr(module, _ACT_FLAG, True)
        patched += 1
    return patched


def _plain_gated_mlp(module: Any, name: str) -> bool:
    """True when the class forward equals ``down(fn(gate(x), up(x)))`` on a probe with identity-like layers."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, generator=gen)
    probe = copy.copy(module)
    probe._modules = dict(module._modules)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        probe._modules[proj] = torch.nn.Linear(4, 4, bias=False)
        torch.nn.init.normal_(probe._modules[proj].weight, generator=gen)
    try:
        with torch.no_grad():
            stock = type(module).forward(probe, x)
            fused = probe.down_proj(_FUNCTIONS[name](probe.gate_proj(x), probe.up_proj(x)))
    except Exception:  # an MLP whose forward needs more than ``x`` is left alone
        return False
    return torch.allclose(stock, fused, rtol=1e-5, atol=1e-6)


def restore_stock_norms_and_activation(model: Any) -> None:
    """Undo :func:`use_fused_norms` and :func:`use_fused_activation`."""
    unbind_forwards(model.modules(), _NORM_FLAG, _ACT_FLAG)
