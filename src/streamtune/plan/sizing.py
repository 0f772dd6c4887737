"""Sizes of a model built on the ``meta`` device: tensor bytes per codec, per-layer shapes, LoRA parameters.

Nothing here allocates weights: the model is constructed on ``meta`` from its config alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

PART_ALIGN_BYTES = 256
GROUPS = ("attention", "dense_mlp", "router", "experts", "norms", "embeddings", "final_norm", "other")


def align_up(num_bytes: int, align: int = PART_ALIGN_BYTES) -> int:
    """``num_bytes`` rounded up to a multiple of ``align``."""
    return -(-num_bytes // align) * align


@dataclass(frozen=True)
class TensorSize:
    """One frozen tensor: its group, plain bytes, bytes in the planned codec (unaligned) and packed
    (every encoded part aligned to 256 bytes, as in the engine's pinned layer buffer)."""

    name: str
    shape: tuple[int, ...]
    group: str
    numel: int
    plain_bytes: int
    encoded_bytes: int
    compressed: bool
    packed_bytes: int = 0


@dataclass
class LayerShape:
    """Shapes of one decoder layer that the activation and FLOP models need."""

    hidden: int = 0
    num_heads: int = 1
    q_width: int = 0
    kv_width: int = 0
    dense_width: int = 0
    num_experts: int = 0
    expert_ffn: int = 0
    top_k: int = 0
    window: int | None = None
    num_norms: int = 0
    norm_elements: int = 0
    attention_params: int = 0
    dense_params: int = 0
    router_params: int = 0
    expert_params: int = 0

    @property
    def head_dim(self) -> int:
        """Width of one query head."""
        return self.q_width // max(1, self.num_heads)


@dataclass
class LayerSize:
    """One decoder layer: its frozen tensors and shapes.

    Attributes:
        encoded_bytes: the packed host buffer, each part aligned to 256 bytes.
        decoded_bytes: bf16 bytes the compressed tensors decode into (uncompressed ones are used in place).
        lora_params: trainable LoRA parameters attached to this layer.
        lora_folded_bytes: bf16 bytes of the fused parameters LoRA adapts (PEFT folds ``W + B@A`` per forward).
        lora_folded_max_bytes: the largest single such parameter.
    """

    index: int
    tensors: list[TensorSize]
    shape: LayerShape
    lora_params: int = 0
    lora_folded_bytes: int = 0
    lora_folded_max_bytes: int = 0

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def plain_bytes(self) -> int:
        return sum(t.plain_bytes for t in self.tensors)

    @property
    def encoded_bytes(self) -> int:
        """The packed host/slot buffer: every encoded part aligned to 256 bytes."""
        return sum(t.packed_bytes for t in self.tensors)

    @property
    def decoded_bytes(self) -> int:
        """bf16 bytes the compressed tensors decode into (uncompressed ones are used in place)."""
        return sum(align_up(t.plain_bytes) for t in self.tensors if t.compressed)

    @property
    def active_params(self) -> float:
        """Base parameters one token multiplies with (experts scaled by top_k / num_experts)."""
        s = self.shape
        experts = s.expert_params * s.top_k / s.num_experts if s.num_experts else 0.0
        return s.attention_params + s.dense_params + s.router_params + experts


@dataclass
class ModelSize:
    """A whole model on meta: decoder layers, the always-resident rest, LoRA and the head."""

    name: str
    model_type: str
    hidden: int
    vocab: int
    layers: list[LayerSize]
    other: list[TensorSize]
    buffer_bytes: int
    lora_params_outside_layers: int = 0
    layer_types: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def lora_params(self) -> int:
        return sum(layer.lora_params for layer in self.layers) + self.lora_params_outside_layers

    @property
    def resident_other_bytes(self) -> int:
        """Embeddings, final norm, LM head (counted once when tied) and buffers, all bf16 on the GPU."""
        return sum(t.plain_bytes for t in self.other) + self.buffer_bytes

    @property
    def total_params(self) -> int:
        return sum(layer.num_params for layer in self.layers) + sum(t.numel for t in self.other)


def _layer_group(name: str, ndim: int) -> str:
    if ndim == 3:
        return "experts"
    if "router" in name or re.search(r"(^|\.)gate\.weight$", name):
        return "router"
    if ndim <= 1:
        return "norms"
    if "attn" in name:
        return "attention"
    return "dense_mlp"


def _other_group(name: str) -> str:
    if "embed" in name or "lm_head" in name:
        return "embeddings"
    if "norm" in name:
        return "final_norm"
    return "other"


def _tensor_size(name: str, shape: tuple[int, ...], dtype: Any, group: str, codec: str) -> TensorSize:
    from streamtune.quant import encoded_nbytes, get_codec, should_compress

    numel = 1
    for dim in shape:
        numel *= dim
    plain = numel * dtype.itemsize
    compressed = codec != "bf16" and bool(should_compress(name, shape, codec))
    if not compressed:
        return TensorSize(name, shape, group, numel, plain, plain, False, align_up(plain))
    encoded = int(encoded_nbytes(codec, shape, dtype))
    packed = sum(align_up(part.nbytes) for part in get_codec(codec).layout(shape, dtype))
    return TensorSize(name, shape, group, numel, plain, encoded, True, packed)


def _top_k(config: Any) -> int:
    for attr in ("top_k_experts", "num_experts_per_tok"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    return 0


def _norm_saved_elements(layer: Any, name: str, module: Any, hidden: int) -> int:
    """bf16-element equivalents an RMSNorm keeps per token: its fp32 input (2), plus the fp32 normalised
    value when it scales in fp32 (Gemma: 2) or the bf16 normalised value otherwise (1)."""
    leaf = name.rsplit(".", 1)[-1]
    width = hidden
    if leaf[:2] in ("q_", "k_", "v_") and leaf.endswith("norm"):
        parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
        proj = getattr(parent, f"{leaf[0]}_proj", None) or getattr(parent, "k_proj", None)
        width = proj.weight.shape[0] if proj is not None else hidden
    if getattr(module, "weight", None) is None:
        return 2 * width
    scale = 2 if type(module).__name__.startswith("Gemma") else 1
    return (2 + scale) * width


def _layer_shape(layer: Any, config: Any, index: int) -> LayerShape:
    s = LayerShape(hidden=int(config.hidden_size), num_heads=int(config.num_attention_heads), top_k=_top_k(config))
    layer_types = getattr(config, "layer_types", None) or []
    if index < len(layer_types) and "sliding" in str(layer_types[index]):
        s.window = getattr(config, "sliding_window", None)
    for mod_name, module in layer.named_modules():
        leaf = mod_name.rsplit(".", 1)[-1]
        weight = getattr(module, "weight", None)
        if leaf == "q_proj":
            s.q_width = weight.shape[0]
        elif leaf in ("k_proj", "v_proj"):
            s.kv_width += weight.shape[0]
        elif leaf in ("gate_proj", "up_proj") and "expert" not in mod_name:
            s.dense_width = weight.shape[0]
        if "norm" in type(module).__name__.lower():
            s.num_norms += 1
            s.norm_elements += _norm_saved_elements(layer, mod_name, module, s.hidden)
    for name, param in layer.named_parameters():
        group = _layer_group(name, param.dim())
        if group == "experts":
            s.num_experts = param.shape[0]
            s.expert_ffn = min(param.shape[1:]) if "down" in name else s.expert_ffn
            s.expert_params += param.numel()
        elif group in ("attention", "dense_mlp", "router") and param.dim() == 2:
            setattr(s, f"{'dense' if group == 'dense_mlp' else group}_params",
                    getattr(s, f"{'dense' if group == 'dense_mlp' else group}_params") + param.numel())
    return s


def _matches_module(targets: str | list[str], key: str) -> bool:
    # Same rule as PEFT's target_modules: a string is a full-match regex, a list matches exact names or suffixes.
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith(f".{t}") for t in targets)


def _matches_parameter(targets: list[str], key: str) -> bool:
    return any(key == t or key.endswith(f".{t}") for t in targets)


def lora_params_of_module(module: Any, rank: int) -> int:
    """Trainable parameters PEFT adds to one targeted module (``Linear``/``Embedding``: ``r * (in + out)``).

    Raises:
        ValueError: the module is of a kind PEFT LoRA does not adapt here.
    """
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"{type(module).__name__} is not a Linear or Embedding layer")
    return rank * (weight.shape[0] + weight.shape[1])


def lora_params_of_parameter(shape: tuple[int, ...], rank: int) -> int:
    """Trainable parameters of PEFT's ``ParamWrapper`` on a fused parameter.

    A 3-D ``[E, a, b]`` parameter gets ``lora_A`` ``[r*E, in]`` and ``lora_B`` ``[out, r*E]`` with
    ``{in, out} = {a, b}``: ``r * E * (a + b)``; a 2-D one ``r * (a + b)``.
    """
    num_experts = shape[0] if len(shape) == 3 else 1
    return rank * num_experts * (shape[-2] + shape[-1])


def build_meta_model(config: Any) -> Any:
    """The causal LM of ``config`` on the ``meta`` device in bf16 (no memory, no weights)."""
    import torch

    from streamtune.models.build import build_empty

    return build_empty(config, torch.bfloat16, device="meta")


def _lora_counts(model: Any, layer_prefixes: list[str], rank: int, targets: str | list[str],
                 target_parameters: list[str]) -> tuple[dict[int, list[int]], int]:
    """Per layer index ``[lora_params, folded_bytes, folded_max_bytes]``, and LoRA params outside layers."""
    per_layer = {i: [0, 0, 0] for i in range(len(layer_prefixes))}
    outside = 0

    def layer_of(key: str) -> int | None:
        for i, prefix in enumerate(layer_prefixes):
            if key.startswith(prefix):
                return i
        return None

    if targets:
        for key, module in model.named_modules():
            if key and _matches_module(targets, key) and getattr(module, "weight", None) is not None:
                count = lora_params_of_module(module, rank)
                index = layer_of(key + ".")
                if index is None:
                    outside += count
                else:
                    per_layer[index][0] += count
    for key, param in model.named_parameters():
        if target_parameters and _matches_parameter(target_parameters, key):
            index = layer_of(key)
            count = lora_params_of_parameter(tuple(param.shape), rank)
            if index is None:
                outside += count
                continue
            folded = param.numel() * param.dtype.itemsize
            entry = per_layer[index]
            entry[0] += count
            entry[1] += folded
            entry[2] = max(entry[2], folded)
    return per_layer, outside


def size_model(
    config: Any, codec: str, lora_rank: int, lora_targets: str | list[str], lora_target_parameters: list[str],
    model: Any = None, name: str = "",
) -> ModelSize:
    """Size every tensor of ``config``'s model on meta, in ``codec``, with the LoRA that would attach.

    Args:
        config: a HF config (preset or ``config.json``).
        codec: bf16, int8 or nf4; tensors ``streamtune.quant.should_compress`` refuses stay bf16.
        lora_rank: LoRA rank r.
        lora_targets: a PEFT ``target_modules`` regex string or a list of module names ("" or [] for none).
        lora_target_parameters: fused parameter names (e.g. ``experts.gate_up_proj``).
        model: a meta model of ``config`` to reuse (built when None).
        name: the model's name for reports.
    """
    from streamtune.models.adapters import decoder
    from streamtune.models.build import text_config

    model = build_meta_model(config) if model is None else model
    cfg = text_config(config)
    dec = decoder(model)
    prefix = next(n for n, m in model.named_modules() if m is dec)
    prefix = f"{prefix}.layers." if prefix else "layers."
    prefixes = [f"{prefix}{i}." for i in range(len(dec.layers))]
    lora, lora_outside = _lora_counts(model, prefixes, lora_rank, lora_targets, list(lora_target_parameters))
    layers = []
    for i, layer in enumerate(dec.layers):
        tensors = [_tensor_size(prefixes[i] + n, tuple(p.shape), p.dtype, _layer_group(n, p.dim()), codec)
                   for n, p in layer.named_parameters()]
        layers.append(LayerSize(i, tensors, _layer_shape(layer, cfg, i), *lora[i]))
    other = []
    for n, p in model.named_parameters():
        if not any(n.startswith(pre) for pre in prefixes):
            plain = p.numel() * p.dtype.itemsize
            other.append(TensorSize(n, tuple(p.shape), _other_group(n), p.numel(), plain, plain, False, plain))
    buffer_bytes = sum(b.numel() * b.dtype.itemsize for _, b in model.named_buffers())
    return ModelSize(
        name=name, model_type=str(getattr(cfg, "model_type", "")), hidden=int(cfg.hidden_size),
        vocab=int(cfg.vocab_size), layers=layers, other=other, buffer_bytes=buffer_bytes,
        lora_params_outside_layers=lora_outside, layer_types=list(getattr(cfg, "layer_types", None) or []),
    )
