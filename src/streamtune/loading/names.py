"""Model parameter names -> checkpoint tensors, per architecture and checkpoint layout.

What ``save_pretrained`` of transformers 5.24 writes (checked by saving tiny models):

- Llama/Mistral/Qwen3 and Gemma4 text: the in-memory names (``model.layers.N...``).
- Gemma4 multimodal (``Gemma4ForConditionalGeneration``): the text model under
  ``model.language_model.``; ``model.vision_tower.`` / ``model.audio_tower.`` / ``model.embed_vision.`` ...
  are towers that streamtune does not train (skipped, listed). Gemma4 experts are stored fused.
- Qwen3-MoE: per-expert ``mlp.experts.E.{gate,up,down}_proj.weight`` (the hub layout), loaded into the
  fused ``mlp.experts.gate_up_proj`` [E, 2F, H] (gate rows, then up rows) and ``down_proj`` [E, H, F].
- Mixtral: ``block_sparse_moe.gate.weight`` and per-expert ``block_sparse_moe.experts.E.w{1,3,2}.weight``
  (w1 = gate, w3 = up, w2 = down).

A fused name present in the checkpoint always wins, so checkpoints written fused load too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MULTIMODAL_TEXT_PREFIX = "model.language_model."
_PEFT_SEGMENTS = re.compile(r"(^|\.)base_layer(?=\.|$)")


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor copied into part of a model tensor.

    Attributes:
        name: checkpoint tensor name.
        expert: index into dim 0 of the destination (None: the whole tensor).
        rows: ``(start, stop)`` slice of dim 1 (of dim 0 after ``expert``), or None for all.
    """

    name: str
    expert: int | None = None
    rows: tuple[int, int] | None = None


def stock_name(name: str) -> str:
    """A parameter name with PEFT's wrapping removed (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    name = name.removeprefix("base_model.model.")
    return _PEFT_SEGMENTS.sub("", name).lstrip(".")


def text_prefix(checkpoint_names: set[str]) -> str:
    """``model.language_model.`` for a multimodal Gemma4 checkpoint, else ``model.``."""
    if any(n.startswith(MULTIMODAL_TEXT_PREFIX) for n in checkpoint_names):
        return MULTIMODAL_TEXT_PREFIX
    return "model."


def full_name(model_name: str, prefix: str) -> str:
    """The checkpoint name of a model tensor named relative to the causal LM (``model.norm.weight``)."""
    if model_name.startswith("model."):
        return prefix + model_name.removeprefix("model.")
    return model_name


def is_skipped(checkpoint_name: str, prefix: str) -> bool:
    """A tensor of a part streamtune does not train (multimodal towers and projectors)."""
    return prefix == MULTIMODAL_TEXT_PREFIX and checkpoint_name.startswith("model.") and \
        not checkpoint_name.startswith(prefix)


def candidates(model_type: str, layer_name: str, shape: tuple[int, ...], layer_prefix: str) -> list[list[Piece]]:
    """Ways to assemble one decoder-layer tensor, best first.

    Args:
        model_type: ``config.model_type``.
        layer_name: stock name relative to the decoder layer (``mlp.experts.gate_up_proj``).
        shape: the model tensor's shape.
        layer_prefix: checkpoint prefix of this layer (``model.layers.3.``).
    """
    direct = [[Piece(layer_prefix + layer_name)]]
    if model_type == "mixtral":
        direct.append([Piece(layer_prefix + layer_name.replace("mlp.", "block_sparse_moe.", 1))])
        return direct + _per_expert(layer_name, shape, layer_prefix + "block_sparse_moe.experts.",
                                    ("w1", "w3", "w2"))
    if model_type == "qwen3_moe":
        return direct + _per_expert(layer_name, shape, layer_prefix + "mlp.experts.",
                                    ("gate_proj", "up_proj", "down_proj"))
    return direct


def _per_expert(layer_name: str, shape: tuple[int, ...], experts_prefix: str,
                names: tuple[str, str, str]) -> list[list[Piece]]:
    gate, up, down = names
    if layer_name == "mlp.experts.gate_up_proj" and len(shape) == 3:
        num_experts, rows = shape[0], shape[1] // 2
        pieces = []
        for e in range(num_experts):
            pieces.append(Piece(f"{experts_prefix}{e}.{gate}.weight", e, (0, rows)))
            pieces.append(Piece(f"{experts_prefix}{e}.{up}.weight", e, (rows, 2 * rows)))
        return [pieces]
    if layer_name == "mlp.experts.down_proj" and len(shape) == 3:
        return [[Piece(f"{experts_prefix}{e}.{down}.weight", e) for e in range(shape[0])]]
    return []
