"""Attaching PEFT LoRA to a stock HF model and saving it as a stock PEFT adapter."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from streamtune.errors import InputError

BASE_INFO_FILE = "streamtune.json"
# peft (0.21) reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model.
PEFT_DEPRECATED_READ = r"`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def peft_wrapping() -> Any:
    """Hide the FutureWarning that peft's own use of a deprecated transformers API raises while it
    wraps a model (that one message only: the user can do nothing about it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATED_READ, category=FutureWarning)
        yield


def attach_lora(model: Any, adapter: Any, lora_cfg: Any, seed: int) -> Any:
    """Wrap ``model`` in a PEFT LoRA model; only the LoRA parameters require grad.

    Args:
        model: a stock HF causal LM (on the CPU, before :func:`streamtune.offload.place`).
        adapter: its :class:`~streamtune.models.ArchAdapter`.
        lora_cfg: a :class:`~streamtune.config.LoraConfig`. ``targets="auto"`` uses
            ``adapter.default_lora_targets`` (a regex); a list names modules (PEFT suffix match);
            ``target_parameters`` adapts fused parameters such as ``experts.gate_up_proj``.
        seed: seeds the LoRA initialisation (same seed, same adapter).

    Returns:
        The ``peft.PeftModel``. LoRA weights are float32 whatever the base dtype.

    Raises:
        InputError: a target or target parameter matches nothing in the model (the message names the
            key and lists the names that exist).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from streamtune.lora.targets import check_lora_targets

    check_lora_targets(model, lora_cfg)
    targets = adapter.default_lora_targets if lora_cfg.targets == "auto" else list(lora_cfg.targets)
    if isinstance(lora_cfg.targets, list) and not lora_cfg.targets:
        targets = None
    config = LoraConfig(
        r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=targets, target_parameters=list(lora_cfg.target_parameters) or None,
        task_type="CAUSAL_LM", bias="none",
    )
    torch.manual_seed(seed)
    try:
        with peft_wrapping():
            peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as exc:
        key = "lora.target_parameters" if lora_cfg.target_parameters and "parameter" in str(exc).lower() else "lora.targets"
        raise InputError(
            f"{key}: {exc}. Give module names that exist in {type(model).__name__} "
            f"(e.g. q_proj, v_proj) or use lora.targets=auto"
        ) from exc
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def trainable_state(model: Any) -> dict[str, Any]:
    """CPU copies of every trainable parameter, by full name (exact, for checkpoints)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: Any, state: dict[str, Any]) -> None:
    """Copy tensors saved by :func:`trainable_state` back into ``model`` in place.

    Raises:
        InputError: the names do not match the model's trainable parameters.
    """
    import torch

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing = sorted(set(params) - set(state))[:3]
        extra = sorted(set(state) - set(params))[:3]
        raise InputError(
            f"checkpoint does not match this run's LoRA parameters (missing {missing}, unexpected {extra}); "
            "resume with the config the run was started with"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def save_adapter(model: Any, out_dir: str | Path, tokenizer: Any = None, base_info: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s adapter in PEFT format to ``out_dir``, atomically (temp dir + rename).

    Also writes the tokenizer (when given) and ``streamtune.json`` (``base_info``: how to rebuild
    the base model). ``adapter_config.json``'s ``base_model_name_or_path`` points at
    ``base_info["base_dir"]`` or the model directory, so ``AutoPeftModelForCausalLM`` can load it.
    """
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    write_adapter_files(model, tmp_dir, base_info, base_root=out_dir.parent)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp_dir))
    old_dir = out_dir.with_name(f".old-{out_dir.name}")
    if out_dir.exists():
        shutil.rmtree(old_dir, ignore_errors=True)
        os.replace(out_dir, old_dir)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    return out_dir


def write_adapter_files(model: Any, out_dir: str | Path, base_info: dict[str, Any] | None, base_root: Path) -> None:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``streamtune.json`` into ``out_dir``.

    Args:
        model: the PEFT model.
        out_dir: the directory to write into (created; the caller renames it into place).
        base_info: how to rebuild the base model (``streamtune.json``); its ``base_dir`` is relative to
            ``base_root`` (the run directory) and is rewritten relative to ``out_dir``'s parent, where
            :func:`build_base_for_adapter` looks.
        base_root: the directory ``base_info["base_dir"]`` is relative to.
    """
    out_dir = Path(out_dir)
    info = dict(base_info) if base_info is not None else None
    if info is not None and info.get("base_dir"):
        final_parent = out_dir.parent.resolve()
        info["base_dir"] = os.path.relpath((Path(base_root) / info["base_dir"]).resolve(), final_parent)
    base_path = _base_path(info or {}, out_dir)
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_path
    # Embeddings are never adapted; False also stops PEFT from probing the Hub for the base config.
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    if info is not None:
        (out_dir / BASE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _base_path(base_info: dict[str, Any], adapter_dir: Path) -> str | None:
    base_dir = base_info.get("base_dir")
    if base_dir:
        return str((adapter_dir.parent / base_dir).resolve())
    name = base_info.get("model_name")
    if name and Path(name).is_dir():
        return str(Path(name).resolve())
    return name


def read_base_info(adapter_dir: str | Path) -> dict[str, Any]:
    """What ``streamtune.json`` records about the base model, or what PEFT's config says.

    Raises:
        InputError: ``adapter_dir`` is not a PEFT adapter directory.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InputError(
            f"ADAPTER_DIR: {str(adapter_dir)!r} holds no adapter_config.json; pass a PEFT adapter "
            "directory such as runs/quickstart/adapter"
        )
    info_file = adapter_dir / BASE_INFO_FILE
    if info_file.is_file():
        return json.loads(info_file.read_text())
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {"model_name": peft_config.get("base_model_name_or_path"), "seed": 0, "dtype": "float32"}


def build_base_for_adapter(adapter_dir: str | Path, dtype: str | None = None) -> tuple[Any, Any]:
    """Rebuild the base model an adapter was trained on, on the CPU.

    Prefers the saved base (``base_dir`` next to the adapter), then the preset (name + seed),
    then the checkpoint directory.

    Returns:
        ``(model, arch_adapter)``.

    Raises:
        InputError: the base model cannot be found.
    """
    import torch

    from streamtune.models.build import adapter_for_or_input_error, build_model

    adapter_dir = Path(adapter_dir)
    info = read_base_info(adapter_dir)
    torch_dtype = getattr(torch, dtype or info.get("dtype") or "float32")
    base_dir = info.get("base_dir")
    if base_dir and (adapter_dir.parent / base_dir / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(adapter_dir.parent / base_dir), dtype=torch_dtype)
        return model.eval(), adapter_for_or_input_error(model.config)
    name = info.get("model_name")
    if not name:
        raise InputError(
            f"ADAPTER_DIR: {str(adapter_dir)!r} does not say which base model it was trained on "
            f"(no {BASE_INFO_FILE} and no base_model_name_or_path)"
        )
    return build_model(name, torch_dtype, int(info.get("seed", 0)), bool(info.get("trust_remote_code", False)))
