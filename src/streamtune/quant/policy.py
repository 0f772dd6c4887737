"""Which frozen tensors get compressed: the per-tensor policy of the planner and the loader."""

from __future__ import annotations

import re

# Tensors that stay in their own dtype whatever the codec: small or precision-critical ones.
KEEP_PATTERNS = (
    re.compile(r"norm"),
    re.compile(r"router"),
    re.compile(r"(^|\.)gate(\.|$)"),
    re.compile(r"shared_expert_gate"),
    re.compile(r"embed"),
    re.compile(r"lm_head"),
    re.compile(r"(^|\.)bias$"),
)


def should_compress(param_name: str, shape, codec) -> bool:
    """Whether the frozen tensor ``param_name`` of ``shape`` is stored with ``codec``.

    Kept uncompressed (identity codec): tensors of fewer than 2 dimensions, norms, MoE router/gate
    projections (``router``, ``mlp.gate.``, ``block_sparse_moe.gate.``, ``shared_expert_gate``),
    embeddings, the LM head and biases. Everything else of 2 or more dimensions (attention and MLP
    projections, fused 3-D expert tensors) uses ``codec``.

    Args:
        param_name: the parameter's full name, e.g. ``model.layers.0.mlp.experts.down_proj``.
        shape: the parameter's shape.
        codec: a codec name or a ``Codec``.

    Raises:
        ValueError: ``codec`` names no known codec.
    """
    from streamtune.quant import get_codec

    resolved = get_codec(codec) if isinstance(codec, str) else codec
    if resolved.is_identity or len(tuple(shape)) < 2:
        return False
    return not any(pattern.search(param_name) for pattern in KEEP_PATTERNS)
