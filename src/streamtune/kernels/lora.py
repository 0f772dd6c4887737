"""LoRA products in the activations' dtype, with the fp32 LoRA weights kept as master weights.

PEFT's LoRA ``Linear.forward`` casts the input up to the adapter's dtype (fp32 in streamtune, see
:func:`streamtune.lora.attach_lora`) and the sum back down: two copies of every activation per
adapted layer, forward and backward (~2000 dtype-copy kernels per 26B step). Here the small LoRA
matrices are cast down instead (``r x in`` and ``out x r`` elements) and the update is one
``addmm`` onto the base output; the optimizer still sees fp32 parameters and fp32 gradients.
"""

from __future__ import annotations

import types
from typing import Any

from streamtune.kernels.counters import count

_PATCH_FLAG = "_streamtune_compute_dtype_lora"


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
        weight_a = self.lora_A[name].weight.to(x.dtype)
        weight_b = self.lora_B[name].weight.to(x.dtype)
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

    patched = 0
    for module in model.modules():
        if type(module) is Linear and not getattr(module, _PATCH_FLAG, False):
            module.forward = types.MethodType(compute_dtype_lora_forward, module)
            setattr(module, _PATCH_FLAG, True)
            patched += 1
    return patched


def restore_stock_lora(model: Any) -> None:
    """Undo :func:`use_compute_dtype_lora` (PEFT's own forward again)."""
    for module in model.modules():
        if getattr(module, _PATCH_FLAG, False):
            del module.forward
            setattr(module, _PATCH_FLAG, False)
