"""The fast training path: kernels chosen per device, the stock HF path as the reference.

``train.kernels=auto`` applies, where the device supports them, LoRA in the compute dtype
(:mod:`.lora`), the fused linear + soft-capped cross-entropy (:mod:`.linear_ce`), FlexAttention
with block masks (:mod:`.attention`), expert LoRA as grouped low-rank products (:mod:`.experts`),
fused RMSNorm and gated activation (:mod:`.fused`) and, when ``train.compile_layers`` asks for it,
regional compile of the decoder layers (:mod:`.regional`); ``eager`` keeps every stock HF/PEFT code path.
Importing this package imports no torch.
"""

from __future__ import annotations

from typing import Any

from streamtune.kernels.counters import calls, reset
from streamtune.kernels.select import KERNEL_MODES, KernelChoice, select_for_device, select_kernels

__all__ = ["KERNEL_MODES", "KernelChoice", "apply_kernels", "calls", "reset", "select_for_device", "select_kernels"]


def apply_kernels(model: Any, choice: KernelChoice) -> dict[str, Any]:
    """Switch ``model`` (PEFT-wrapped) to the fast pieces of ``choice`` that patch modules.

    The loss kernel is not a module patch: pass ``choice`` to :func:`streamtune.train.loss.lm_loss_sum`.

    Returns:
        What was applied: ``{"lora_layers": n, "attention": name or None, "expert_lora_modules": n}``, plus
        ``fused_norms``, ``fused_activations``, ``compiled_layers`` and ``fast_experts_modules`` (counts) where
        those pieces are selected.
    """
    applied: dict[str, Any] = {"lora_layers": 0, "attention": None, "expert_lora_modules": 0}
    if choice.fused_norm_act:
        from streamtune.kernels.fused import use_fused_activation, use_fused_norms

        applied["fused_norms"] = use_fused_norms(model)
        applied["fused_activations"] = use_fused_activation(model)
    if choice.compile_layers:
        from streamtune.kernels.regional import compile_layers
        from streamtune.models import decoder

        applied["compiled_layers"] = compile_layers(decoder(model).layers)
    if choice.lora_compute_dtype:
        from streamtune.kernels.lora import use_compute_dtype_lora

        applied["lora_layers"] = use_compute_dtype_lora(model)
    if choice.expert_lora:
        from streamtune.kernels.experts import use_fast_expert_lora

        applied["expert_lora_modules"] = use_fast_expert_lora(model, choice.expert_lora)
    if choice.fast_experts:
        from streamtune.kernels.experts import use_fast_experts

        applied["fast_experts_modules"] = use_fast_experts(model, choice.expert_lora or "loop")
    if choice.flex_attention:
        from streamtune.kernels.attention import FLEX_NAME, use_flex_attention
        from streamtune.models import unwrap

        if getattr(unwrap(model), "_supports_flex_attn", False):
            use_flex_attention(model, choice)
            applied["attention"] = FLEX_NAME
    return applied
