"""LoRA products in the activations' dtype, with the fp32 LoRA weights kept as master weights.

PEFT's LoRA ``Linear.forward`` casts the input up to the adapter's dtype (fp32 in streamtune, see
:func:`streamtune.lora.attach_lora`) and the sum back down: two copies of every activation per
adapted layer, forward and backward (~2000 dtype-copy kernels per 26B step). Here the small LoRA
matrices are cast down instead (``r x in`` and ``out x r`` elements) and the update is one
``addmm`` onto the base output; the optimizer still sees fp32 parameters and fp32 gradients.

The cast copies are kept until the weights change (:class:`_CastOnce`): a weight changes only at the
optimizer step, but the forward, the streamed recompute and every micro-batch each cast it again, two
cast kernels per adapted projection and pass (about 840 launches per 26B micro-batch). A copy is renewed
after any optimizer step (a global step hook: fused AdamW updates weights without bumping their version
counter, measured on the CPU) and after any in-place change of the weight (its version counter).
"""

from __future__ import annotations

import types
from typing import Any

import torch

from streamtune.kernels.binding import unbind_forwards
from streamtune.kernels.counters import count

_PATCH_FLAG = "_streamtune_compute_dtype_lora"
_CAST_CACHE = "_streamtune_lora_casts"
_STEPS: dict[str, Any] = {"count": 0, "hook": None}


def _count_step(*_: Any) -> None:
    _STEPS["count"] += 1


def _watch_optimizer_steps() -> None:
    """Count every optimizer step in this process (idempotent), whatever the optimizer's implementation."""
    if _STEPS["hook"] is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEPS["hook"] = register_optimizer_step_post_hook(_count_step)


class _CastOnce(torch.autograd.Function):
    """forward(weight, copy) -> ``copy`` (``weight``, cast already); backward: the gradient in ``weight``'s dtype."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.dtype = weight.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype), None


def cast_weight(module: Any, key: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)`` with autograd, cast once per optimizer step and version of ``weight`` (an in-place
    change or ``load_state_dict`` bumps it) and kept on ``module``; inside a compiled region a plain cast."""
    if weight.dtype == dtype or torch.compiler.is_compiling():
        return weight.to(dtype)
    cache = module.__dict__.setdefault(_CAST_CACHE, {})
    hit = cache.get(key)
    # a ``.data`` swap keeps no version count, but moves the bytes
    version = (_STEPS["count"], weight._version, weight.data_ptr())
    if hit is None or hit[0] != version or hit[1].dtype != dtype or hit[1].device != weight.device:
        with torch.no_grad():
            hit = cache[key] = (version, weight.to(dtype))
        count("lora_cast")
    return _CastOnce.apply(weight, hit[1]) if weight.requires_grad and torch.is_grad_enabled() else hit[1]


def _plain_lora(module: Any, x: Any, args: tuple, kwargs: dict) -> bool:
    """True where the fast form computes what PEFT would (no variants, merges or mixed batches)."""
    return (not args and not kwargs and not module.disable_adapters and not module.merged
            and not module.lora_variant and x.is_floating_point())


def compute_dtype_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """``base(x) + scaling * B(A(dropout(x)))`` with A and B cast to ``x.dtype`` (bound per module)."""
    if not _plain_lora(self, x, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    out_features = result.shape[-1]
    flat = result.reshape(-1, out_features)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        weight_a = cast_weight(self, f"{name}.A", self.lora_A[name].weight, x.dtype)
        weight_b = cast_weight(self, f"{name}.B", self.lora_B[name].weight, x.dtype)
        low_rank = self.lora_dropout[name](x).reshape(-1, x.shape[-1]) @ weight_a.t()
        flat = flat.addmm(low_rank, weight_b.t(), alpha=self.scaling[name])
        count("lora_compute_dtype")
    return flat.view(result.shape)


def use_compute_dtype_lora(model: Any) -> int:
    """Bind :func:`compute_dtype_lora_forward` to every PEFT LoRA ``Linear`` of ``model``.

    Returns:
        The number of LoRA layers patched (0 when the model has none).
    """
    from peft.tuners.lora.layer import Linear

    _watch_optimizer_steps()
    patched = 0
    for module in model.modules():
        if type(module) is Linear and not getattr(module, _PATCH_FLAG, False):
            module.forward = types.MethodType(compute_dtype_lora_forward, module)
            setattr(module, _PATCH_FLAG, True)
            patched += 1
    return patched


def restore_stock_lora(model: Any) -> None:
    """Undo :func:`use_compute_dtype_lora` (PEFT's own forward again)."""
    unbind_forwards(model.modules(), _PATCH_FLAG, drop=(_CAST_CACHE,))
