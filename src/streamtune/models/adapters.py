"""Architecture adapters: where a stock HF causal LM keeps its decoder layers, embeddings and experts.

Everything that knows module names lives here, so the engine, LoRA and loss code stay generic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchAdapter:
    """What streamtune needs to know about one architecture family.

    Attributes:
        name: family name.
        model_types: HF ``config.model_type`` values it covers.
        default_lora_targets: regex (PEFT ``target_modules`` string) of the default LoRA targets.
        expert_parameters: fused expert parameter names relative to a decoder layer.
        logit_softcap_attr: config attribute of the final logit soft-cap, if any.
    """

    name: str
    model_types: tuple[str, ...]
    default_lora_targets: str
    expert_parameters: tuple[str, ...] = ()
    logit_softcap_attr: str | None = None

    def text_config(self, config: Any) -> Any:
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def logit_softcap(self, config: Any) -> float | None:
        if self.logit_softcap_attr is None:
            return None
        return getattr(self.text_config(config), self.logit_softcap_attr, None)


def _names(*names: str) -> str:
    # Anchored to a decoder layer so a multimodal tower's projections never match.
    return r".*layers\.\d+\.(self_attn|mlp)\.(" + "|".join(names) + ")"


ADAPTERS = (
    ArchAdapter("gemma4", ("gemma4", "gemma4_text"), _names(*ATTENTION, *DENSE_MLP),
                ("experts.gate_up_proj", "experts.down_proj"), "final_logit_softcapping"),
    ArchAdapter("qwen3_moe", ("qwen3_moe",), _names(*ATTENTION), ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
    ArchAdapter("mixtral", ("mixtral",), _names(*ATTENTION), ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
    ArchAdapter("llama", ("llama", "mistral", "qwen2", "qwen3"), _names(*ATTENTION, *DENSE_MLP)),
)


def adapter_for(config: Any) -> ArchAdapter:
    """The adapter of a HF config.

    Raises:
        ValueError: the architecture is not supported (the message lists those that are).
    """
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    known = sorted(t for a in ADAPTERS for t in a.model_types)
    raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(known)}")


def unwrap(model: Any) -> Any:
    """The stock HF model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable_activation_checkpointing(model: Any) -> None:
    """Turn on the stock (non-reentrant) activation checkpointing of a HF model's decoder layers.

    Newer transformers name it ``activation_checkpointing_enable`` and warn on the old
    ``gradient_checkpointing_enable``; older ones have only the old name.
    """
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def decoder(model: Any) -> Any:
    """The text decoder module (owner of ``embed_tokens``, ``layers``, ``norm``).

    Raises:
        ValueError: no decoder stack found.
    """
    base = unwrap(model)
    inner = getattr(base, "model", base)
    for candidate in (getattr(inner, "language_model", None), inner):
        if candidate is not None and hasattr(candidate, "layers") and hasattr(candidate, "embed_tokens"):
            return candidate
    raise ValueError(f"{type(base).__name__} has no decoder with .layers and .embed_tokens")


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of decoder layers."""
    return decoder(model).layers


def lm_head(model: Any) -> Any:
    """The output projection (tied to the embeddings where the config says so)."""
    return unwrap(model).get_output_embeddings()
