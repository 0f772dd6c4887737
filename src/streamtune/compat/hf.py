"""transformers / peft entries that need no second device: P10 and N5."""

from __future__ import annotations

import sys
from typing import Any

from streamtune.compat.patches import PatchSet
from streamtune.compat.registry import Outcome, in_affected_range, installed_version

_KBIT_OWNERS = ("peft", "peft.utils", "peft.utils.other")


def reproduce_kbit_upcasts_experts() -> Outcome:
    """N5: ``prepare_model_for_kbit_training`` casts frozen bf16 fused experts to fp32."""
    import peft
    import torch

    from streamtune.compat.offload_lora import tiny_model

    model = tiny_model(num_layers=2).to(torch.bfloat16)
    experts = [(n, p) for n, p in model.named_parameters() if p.dim() == 3]
    before = sum(p.numel() * p.element_size() for _, p in experts)
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    after = sum(p.numel() * p.element_size() for _, p in experts)
    dtypes = sorted({str(p.dtype) for _, p in experts})
    if after > before:
        return Outcome(True, f"{len(experts)} fused expert tensors bf16 -> {', '.join(dtypes)}: "
                             f"{before} -> {after} bytes (x{after / before:.1f})")
    return Outcome(False, f"fused expert tensors keep {', '.join(dtypes)} through prepare_model_for_kbit_training")


def install_kbit_keep_experts(patch_set: PatchSet) -> None:
    """Fix for N5: after peft's cast, 3-D (fused expert) parameters return to their dtype."""
    import peft.utils.other

    original = peft.utils.other.prepare_model_for_kbit_training
    wrapper = _keep_expert_dtypes(original)
    for owner_name in _KBIT_OWNERS:
        owner = sys.modules.get(owner_name)
        if owner is not None and getattr(owner, "prepare_model_for_kbit_training", None) is original:
            patch_set.replace(owner, "prepare_model_for_kbit_training", wrapper)


def _keep_expert_dtypes(original: Any) -> Any:
    def prepare_model_for_kbit_training(model: Any, *args: Any, **kwargs: Any) -> Any:
        kept = {id(p): p.dtype for p in model.parameters() if p.dim() >= 3}
        result = original(model, *args, **kwargs)
        for param in model.parameters():
            dtype = kept.get(id(param))
            if dtype is not None and param.dtype != dtype:
                param.data = param.data.to(dtype)
        return result

    prepare_model_for_kbit_training.__wrapped__ = original
    prepare_model_for_kbit_training.__doc__ = original.__doc__
    return prepare_model_for_kbit_training


def reproduce_mm_token_type_ids() -> Outcome:
    """P10: text-only training of the multimodal Gemma4 demanded ``mm_token_type_ids``.

    A static check of the installed source (a runtime check needs the vision tower's config):
    the bug was a ``raise`` naming ``mm_token_type_ids`` on the training path.
    """
    import inspect
    import re

    from transformers.models.gemma4 import modeling_gemma4

    version = installed_version("transformers")
    source = inspect.getsource(modeling_gemma4)
    raising = re.search(r"raise \w+\((?:[^()]|\([^()]*\))*mm_token_type_ids", source)
    if raising:
        return Outcome(True, f"modeling_gemma4 in transformers {version} raises about mm_token_type_ids")
    if in_affected_range({"transformers": "<5.6"}, {"transformers": version}):
        return Outcome(None, f"transformers {version} is in the affected range <5.6 but no raise was found")
    return Outcome(False, f"transformers {version}: no code path raises for a missing mm_token_type_ids "
                          "(static check; fixed in 5.6)")
