"""Checking ``lora.targets`` / ``lora.target_parameters`` against a model, and counting what LoRA adds.

PEFT matches a ``target_modules`` entry against every module whose dotted name equals it or ends with
``"." + entry``, and silently ignores entries that match nothing as long as one other entry matches;
``target_parameters`` entries that match nothing are ignored altogether. Both would train less than
the config says, so :func:`check_lora_targets` refuses them before any weight is loaded.
"""

from __future__ import annotations

import re
from typing import Any

from streamtune.errors import InputError

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _layer_relative(name: str) -> str:
    match = None
    for match in _LAYER_RE.finditer(name):
        pass
    return name[match.end():] if match else name


def _unique(names: Any) -> list[str]:
    return list(dict.fromkeys(names))


def _existing_modules(model: Any) -> list[str]:
    """Layer-relative names of the modules that hold a 2-D weight (what LoRA can adapt)."""
    names = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and getattr(weight, "ndim", 0) == 2 and not list(module.children()):
            names.append(_layer_relative(name))
    return _unique(names)


def _existing_parameters(model: Any) -> list[str]:
    """Layer-relative names of fused parameters (>= 2-D, not a module's ``weight``)."""
    return _unique(_layer_relative(name) for name, param in model.named_parameters()
                   if param.ndim >= 2 and not name.endswith((".weight", ".bias")))


def _did_you_mean(target: str, options: list[str]) -> str:
    from streamtune.config import did_you_mean

    return did_you_mean(target, options + _unique(o.rsplit(".", 1)[-1] for o in options))


def _listed(missing: list[str]) -> str:
    return f"{', '.join(map(repr, missing))} {'matches' if len(missing) == 1 else 'match'}"


def check_lora_targets(model: Any, lora_cfg: Any) -> None:
    """Refuse LoRA targets that match nothing in ``model`` (a stock HF model, on ``meta`` or not).

    Raises:
        InputError: naming ``lora.targets`` / ``lora.target_parameters``, the entries that match
            nothing, and the module or parameter names that do exist.
    """
    problems = []
    if isinstance(lora_cfg.targets, list) and lora_cfg.targets:
        names = [name for name, _ in model.named_modules()]
        missing = [t for t in lora_cfg.targets if not any(_matches(n, t) for n in names)]
        if missing:
            existing = _existing_modules(model)
            hints = "".join(_did_you_mean(t, existing) for t in missing)
            problems.append(f"lora.targets: {_listed(missing)} no module of {type(model).__name__}{hints}; "
                            f"modules that exist (inside decoder layers, relative): {', '.join(existing)}; "
                            f"or use lora.targets=auto")
    if lora_cfg.target_parameters:
        names = [name for name, _ in model.named_parameters()]
        missing = [t for t in lora_cfg.target_parameters if not any(_matches(n, t) for n in names)]
        if missing:
            existing = _existing_parameters(model)
            hints = "".join(_did_you_mean(t, existing) for t in missing)
            listed = ", ".join(existing) or "none (this model has no fused expert parameters; drop lora.target_parameters)"
            problems.append(f"lora.target_parameters: {_listed(missing)} no parameter of {type(model).__name__}"
                            f"{hints}; fused parameters that exist (inside decoder layers, relative): {listed}")
    if problems:
        raise InputError("; ".join(problems))


def check_lora_targets_of_config(config: Any, lora_cfg: Any) -> None:
    """:func:`check_lora_targets` on the model of a HF ``config`` built on ``meta`` (no memory, no weights).

    Raises:
        InputError: as :func:`check_lora_targets`.
    """
    if not (isinstance(lora_cfg.targets, list) and lora_cfg.targets) and not lora_cfg.target_parameters:
        return
    import torch

    from streamtune.models.build import build_empty

    check_lora_targets(build_empty(config, torch.bfloat16, device="meta"), lora_cfg)


def trainable_by_target(model: Any) -> dict[str, dict[str, int]]:
    """LoRA parameters per target: ``{"self_attn.q_proj": {"layers": 4, "params": 8192, "per_layer": 2048}}``.

    A target is the layer-relative name of the adapted module, or ``module.parameter`` for a fused
    parameter adapted through ``lora.target_parameters``; ``params`` sums over all layers;
    ``per_layer`` is the count in each layer, or None where layers differ (e.g. wider global-attention layers).
    """
    out: dict[str, dict[str, Any]] = {}
    for module_name, module in model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        numel = sum(p.numel() for name, p in module.named_parameters()
                    if p.requires_grad and name.startswith(("lora_A.", "lora_B.", "lora_embedding_")))
        if not numel:
            continue
        name = ".".join(part for part in module_name.split(".") if part != "base_layer")
        parameter = getattr(module, "parameter_name", None)
        target = _layer_relative(f"{name}.{parameter}" if parameter else name)
        layer = _LAYER_RE.findall(name)
        per_layer = out.setdefault(target, {})
        key = layer[-1] if layer else name
        per_layer[key] = per_layer.get(key, 0) + numel
    return {target: {"layers": len(sizes), "params": sum(sizes.values()),
                     "per_layer": next(iter(sizes.values())) if len(set(sizes.values())) == 1 else None}
            for target, sizes in out.items()}
