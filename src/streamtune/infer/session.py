"""A model opened for inference on the streaming engine, placed as training placed it.

The frozen base weights go through :func:`streamtune.offload.place` with the run's codec and
plan (``memory.*`` of the run's ``config.yaml``, overridable), so a model bigger than the GPU can be
tried on the card it was trained on; the LoRA weights, embeddings, norms, LM head and the KV cache
live on the compute device. On a CPU the same code runs with the CPU device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamtune.errors import InputError
from streamtune.infer.source import ModelSource, resolve_source


@dataclass
class InferenceOptions:
    """How to open a model; None keeps the run's setting (or the default when there is no run)."""

    device: str = "auto"
    dtype: str | None = None
    codec: str | None = None
    stream: str | None = None
    gpu_budget: str | None = None
    max_tokens: int = 2048


class InferenceModel:
    """A placed (optionally LoRA-adapted) model with its tokenizer; :meth:`close` releases it, leaving ordinary
    CPU weights, and leaving a ``with`` block discards it.

    Attributes:
        model: the placed model (a ``PeftModel`` when an adapter was loaded).
        arch: its :class:`~streamtune.models.ArchAdapter`.
        tokenizer: the tokenizer of the run (or of the base model).
        device: compute device.
        source: the resolved :class:`~streamtune.infer.source.ModelSource`.
        config: the RunConfig that placed it (run's config with the options applied).
        placement: the :class:`~streamtune.offload.Placement`.
    """

    def __init__(self, model: Any, arch: Any, tokenizer: Any, device: Any, source: ModelSource, config: Any,
                 placement: Any):
        self.model, self.arch, self.tokenizer, self.device = model, arch, tokenizer, device
        self.source, self.config, self.placement = source, config, placement

    def close(self) -> None:
        """Release the engine (streamed weights back into ordinary CPU tensors; the model stays usable)."""
        if self.placement is not None:
            self.placement.close()
            self.placement = None

    def discard(self) -> None:
        """Free the engine's buffers without decoding the weights back (the model is unusable afterwards)."""
        if self.placement is not None:
            self.placement.discard()
            self.placement = None

    def __enter__(self) -> "InferenceModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        # leaving the block ends the model's use: decoding the whole base back into host RAM would cost its full
        # bf16 size (about 50 GB for a 26B model) and time, for nothing; call close() first to keep it
        self.discard()


def run_config_for(source: ModelSource, options: InferenceOptions) -> Any:
    """The RunConfig that places the model: the run's own (when known) with ``options`` applied.

    Raises:
        InputError: an option has a bad value (names the flag).
    """
    from streamtune.config import ConfigError, from_dict

    raw = {section: dict(values) for section, values in source.run_config.items() if isinstance(values, dict)}
    model = raw.setdefault("model", {})
    model.update(name=source.base_name, seed=source.seed, trust_remote_code=source.trust_remote_code)
    memory = raw.setdefault("memory", {})
    memory["gradient_checkpointing"] = False
    memory["cache_dir"] = None
    for key, value in (("codec", options.codec), ("stream", options.stream), ("gpu_budget", options.gpu_budget)):
        if value is not None:
            memory[key] = value
    train = raw.setdefault("train", {})
    train["device"] = options.device
    train["batch_size"] = 1
    raw.setdefault("data", {}).setdefault("path", "-")
    data = raw["data"]
    data["seq_len"] = max(8, int(options.max_tokens))
    if options.dtype is not None:
        model["dtype"] = options.dtype
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise InputError(f"options: {exc}") from exc


def open_model(spec: str, options: InferenceOptions | None = None) -> InferenceModel:
    """Open ``MODEL_OR_ADAPTER`` for generation or evaluation, placed on the streaming engine.

    Args:
        spec: preset name, checkpoint directory, adapter directory, run checkpoint or run directory.
        options: device, dtype, codec, stream, GPU budget and the longest sequence to plan for.

    Raises:
        InputError: the source cannot be resolved, the base model or tokenizer is missing, or the
            plan says the model does not fit.
    """
    from streamtune.devices import plan_on_device, resolve_device, resolve_dtype
    from streamtune.loading import open_base

    options = options or InferenceOptions()
    source = resolve_source(spec)
    cfg = run_config_for(source, options)
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    tokenizer = _tokenizer(source, cfg)
    plan = plan_on_device(cfg, device) if device.type == "cuda" else None
    base = open_base(cfg.model, dtype, progress=False)
    model, arch = base.model, base.adapter
    # the engine packs (and streams) frozen weights only; PEFT freezes the base, a bare base is frozen here
    model.requires_grad_(False)
    if source.adapter_dir is not None:
        model = _attach_adapter(model, source.adapter_dir)
    placement = _place(model, arch, cfg, device, plan, base)
    if source.adapter_dir is not None:
        _load_adapter_weights(model, source.adapter_dir)
    model.eval()
    return InferenceModel(model, arch, tokenizer, placement.device, source, cfg, placement)


def _tokenizer(source: ModelSource, cfg: Any) -> Any:
    from types import SimpleNamespace

    from streamtune.data import load_tokenizer

    tokenizer_dir = str(source.tokenizer_dir) if source.tokenizer_dir is not None else cfg.model.tokenizer
    return load_tokenizer(SimpleNamespace(name=cfg.model.name, tokenizer=tokenizer_dir,
                                          trust_remote_code=cfg.model.trust_remote_code))


def _attach_adapter(model: Any, adapter_dir: Path) -> Any:
    """Wrap ``model`` in PEFT LoRA as the adapter's config says (weights are loaded after placing)."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig.from_pretrained(str(adapter_dir))
    # trainable as in training: the engine packs only frozen weights, LoRA stays an ordinary device tensor
    config.inference_mode = False
    config.lora_dropout = 0.0
    config.base_model_name_or_path = getattr(model, "name_or_path", None) or None  # PEFT warns when they differ
    from streamtune.lora.adapter import peft_wrapping

    try:
        with peft_wrapping():
            peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as exc:
        raise InputError(f"MODEL_OR_ADAPTER: the adapter {str(adapter_dir)!r} does not fit its base model: {exc}") from exc
    for name, param in peft_model.named_parameters():
        # as in training: LoRA weights are float32 whatever the base dtype
        if "lora_" in name and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def _place(model: Any, arch: Any, cfg: Any, device: Any, plan: Any, base: Any) -> Any:
    from streamtune.offload import place

    try:
        return place(model, arch, cfg.memory, device, plan=plan, load_tensor=base.load_tensor)
    finally:
        base.finish()


def _load_adapter_weights(model: Any, adapter_dir: Path) -> None:
    """Copy ``adapter_model.safetensors`` into the placed LoRA weights.

    Raises:
        InputError: the file is missing or names weights the model does not have.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise InputError(f"MODEL_OR_ADAPTER: {str(adapter_dir)!r} has no adapter_model.safetensors")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing:
        raise InputError(
            f"MODEL_OR_ADAPTER: {path} does not match the base model (unexpected {unexpected[:3]}, "
            f"missing {missing[:3]}); is this adapter trained on {model.peft_config['default'].base_model_name_or_path}?"
        )
