"""peft LoRA on accelerate-offloaded layers (P8, N1, N2) and the helper that fixes it."""

from __future__ import annotations

import logging
from typing import Any

from streamtune.compat.patches import PatchSet
from streamtune.compat.registry import Outcome

log = logging.getLogger("streamtune.compat")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_OFFLOADED_LAYERS = (1, 2)


def tiny_model(num_layers: int = 3, seed: int = 0) -> Any:
    """A random-weight Gemma4 text model (the tiny preset, ``num_layers`` layers) on the CPU."""
    import torch

    from streamtune.models.build import build_empty, random_fill_
    from streamtune.models.presets import tiny_gemma4

    config = tiny_gemma4()
    config.num_hidden_layers = num_layers
    config.layer_types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
    config._experts_implementation = "batched_mm"
    torch.manual_seed(seed)
    model = build_empty(config, torch.float32, device="cpu")
    random_fill_(model, seed)
    model.tie_weights()
    return model


def offload_device_map(model: Any, main: str, offloaded: tuple[int, ...] = _OFFLOADED_LAYERS) -> dict[str, str]:
    """A ``device_map`` putting decoder layers ``offloaded`` on ``"cpu"`` (offloaded), the rest on ``main``."""
    device_map = {"model.embed_tokens": main, "model.norm": main, "model.rotary_emb": main, "lm_head": main}
    for index in range(len(model.model.layers)):
        device_map[f"model.layers.{index}"] = "cpu" if index in offloaded else main
    return device_map


def offload_layers(model: Any, offloaded: tuple[int, ...] = _OFFLOADED_LAYERS) -> Any:
    """Offload decoder layers ``offloaded`` with accelerate's hooks, executing on the CPU.

    This is the hook a ``device_map`` entry ``"cpu"`` gets (weights in a CPU map, meta in the
    module, copied in per forward); ``dispatch_model`` itself skips hooks when every device is the CPU.
    """
    import torch
    from accelerate import cpu_offload

    layers = _decoder_layers(model)
    for index in offloaded:
        cpu_offload(layers[index], execution_device=torch.device("cpu"))
    return model


def _decoder_layers(model: Any) -> Any:
    from streamtune.models.adapters import decoder_layers, unwrap

    return decoder_layers(unwrap(model))


def lora_config(rank: int = 4) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0)


def execution_device(module: Any) -> Any | None:
    """The execution device of an accelerate offload hook on ``module``, or None if it has none."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(candidate, "offload", False) and getattr(candidate, "execution_device", None) is not None:
            import torch

            return torch.device(candidate.execution_device)
    return None


def fix_offloaded_lora(model: Any) -> list[str]:
    """Put the LoRA weights of accelerate-offloaded layers on their execution device, trainable.

    Call it after ``get_peft_model`` (or after ``dispatch_model`` when LoRA came first) and
    before building the optimizer. LoRA weights created on ``meta`` (N1) are re-created on the
    base layer's execution device and re-initialised; LoRA modules that got their own offload
    hook (N2) lose it and keep their values as real, resident parameters.

    Returns:
        the qualified names of the LoRA modules that were changed.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    changed = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        device = execution_device(module.get_base_layer())
        if device is None:
            continue
        for holder_name in module.adapter_layer_names:
            holder = getattr(module, holder_name, None)
            for adapter_name, sub in (holder.items() if holder is not None else []):
                state = _materialise(sub, device)
                if state == "meta":
                    module.reset_lora_parameters(adapter_name, _init_mode(model, adapter_name))
                if state:
                    changed.append(f"{name}.{holder_name}.{adapter_name}")
    if changed:
        log.info("streamtune.compat: re-materialised %d LoRA module(s) of offloaded layers", len(changed))
    return changed


def _init_mode(model: Any, adapter_name: str) -> Any:
    config = getattr(model, "peft_config", {}).get(adapter_name)
    return getattr(config, "init_lora_weights", True)


def _materialise(module: Any, device: Any) -> str:
    """Move ``module``'s parameters onto ``device``; returns "meta", "hooked", "moved" or ""."""
    import torch
    from accelerate.hooks import remove_hook_from_module

    if not isinstance(module, torch.nn.Module):
        return ""
    state = ""
    hook = getattr(module, "_hf_hook", None)
    stored = {}
    if hook is not None and getattr(hook, "offload", False):
        stored = {name: hook.weights_map[name] for name, _ in module.named_parameters()}
        remove_hook_from_module(module, recurse=True)
        state = "hooked"
    for full_name, param in list(module.named_parameters()):
        owner_name, _, param_name = full_name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        source = stored.get(full_name)
        if source is None and param.device == device:
            continue
        if source is None and param.device.type == "meta":
            data, state = torch.empty(param.shape, dtype=param.dtype, device=device), "meta"
        else:
            data = (source if source is not None else param.data).detach().to(device).clone()
            state = state or "moved"
        owner._parameters[param_name] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
    return state


def install_lora_after_injection(patch_set: PatchSet) -> None:
    """Fix for P8/N1 in the stock recipe: run ``fix_offloaded_lora`` after peft injects adapters."""
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner.__dict__["inject_adapter"]
    patch_set.replace(BaseTuner, "inject_adapter", _inject_then_fix(original))


def _inject_then_fix(original: Any) -> Any:
    def inject_adapter(self: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, model, *args, **kwargs)
        fix_offloaded_lora(model)
        return result

    inject_adapter.__wrapped__ = original
    inject_adapter.__doc__ = original.__doc__
    return inject_adapter


def _lora_params_of_layers(model: Any, layers: tuple[int, ...]) -> list[tuple[str, Any]]:
    marks = tuple(f"layers.{index}." for index in layers)
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n and any(m in n for m in marks)]


def _step(model: Any, device: str = "cpu") -> Any:
    import torch

    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def reproduce_lora_on_offloaded() -> Outcome:
    """P8/N1: ``get_peft_model`` after ``device_map`` offload; LoRA of offloaded layers on meta."""
    from peft import get_peft_model

    model = offload_layers(tiny_model())
    peft_model = get_peft_model(model, lora_config())
    lora = _lora_params_of_layers(peft_model, _OFFLOADED_LAYERS)
    on_meta = [n for n, p in lora if p.device.type == "meta"]
    try:
        _step(peft_model)
    except RuntimeError as exc:
        return Outcome(True, f"{len(on_meta)}/{len(lora)} LoRA weights of offloaded layers on meta; "
                             f"first backward: {str(exc).splitlines()[0]}")
    if on_meta:
        return Outcome(True, f"{len(on_meta)}/{len(lora)} LoRA weights of offloaded layers are on meta")
    missing = [n for n, p in lora if p.grad is None]
    if missing:
        return Outcome(True, f"{len(missing)} LoRA weights of offloaded layers got no gradient")
    return Outcome(False, "LoRA on offloaded layers: weights real, forward+backward ran, every LoRA weight has a gradient")


def reproduce_lora_before_dispatch() -> Outcome:
    """N2: LoRA attached before ``dispatch_model``; offloaded LoRA weights never receive gradients."""
    from peft import get_peft_model

    peft_model = get_peft_model(tiny_model(), lora_config())
    offload_layers(peft_model)
    _step(peft_model)
    lora = _lora_params_of_layers(peft_model, _OFFLOADED_LAYERS)
    untrained = [n for n, p in lora if p.grad is None]
    if untrained:
        return Outcome(True, f"{len(untrained)}/{len(lora)} LoRA weights of offloaded layers got no gradient "
                             f"(their values live in the offload map and are copied in per forward)")
    return Outcome(False, "every LoRA weight of the offloaded layers received a gradient")
