"""Attention through FlexAttention with block masks, registered with transformers by name.

The name :data:`FLEX_NAME` is registered in transformers' ``AttentionInterface`` (the kernel) and
``AttentionMaskInterface`` (the mask builder); :func:`use_flex_attention` points a model's config
at it. transformers' masking utilities then build one ``BlockMask`` per layer type per forward
(causal, sliding window, packed-sample boundaries from ``position_ids``, padding) with no dense
mask, and every attention layer calls one ``torch.compile(flex_attention)`` (compiled once per
process; a head_dim-512 layer gets the ``kernel_options`` of :mod:`streamtune.kernels.select`).

On the CPU FlexAttention has no backward, so the CPU form (uncompiled, used by tests) is
forward-only; the training fast path selects FlexAttention on CUDA only.
"""

from __future__ import annotations

from typing import Any

from streamtune.kernels.compiling import CompileFallback
from streamtune.kernels.counters import count

FLEX_NAME = "streamtune_flex"
_STATE: dict[str, Any] = {"choice": None, "compiled": None}
FALLBACK = CompileFallback("FlexAttention", "attention falls back to SDPA with dense masks (train.kernels=eager "
                           "silences this)")
# One default FlexAttention mask block: shorter queries go to SDPA with a dense mask (see dense_attention).
MIN_FLEX_QUERY_TOKENS = 128


def _flex_kernel(device_type: str) -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    if _STATE["compiled"] is None:
        from streamtune.kernels.compiling import compile_fn

        _STATE["compiled"] = compile_fn(flex_attention, dynamic=False)
    return _STATE["compiled"]


def _repeat_kv(states: Any, repeats: int) -> Any:
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, repeats, length, dim).reshape(batch, heads * repeats, length, dim)


def flex_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                           scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None,
                           **kwargs: Any) -> tuple[Any, None]:
    """transformers attention function: ``[B, H, T, D]`` inputs, ``[B, T, H, D]`` output.

    Raises:
        ValueError: attention dropout, a dense mask, or extras (sinks, position bias) it cannot take.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if dropout > 0 or softcap is not None or kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise ValueError("streamtune FlexAttention takes no attention dropout, soft-cap, sinks or position bias; "
                         "use train.kernels=eager for this model")
    if attention_mask is not None and not isinstance(attention_mask, BlockMask):
        raise ValueError(f"streamtune FlexAttention needs a BlockMask, got {type(attention_mask).__name__}")
    count("flex_attention")
    if _use_wide(module, query, key):
        from streamtune.kernels.wide_attention import wide_attention

        mask_mod = attention_mask.mask_mod if attention_mask is not None else None
        return wide_attention(query, key, value, mask_mod, scaling).transpose(1, 2).contiguous(), None
    heads, kv_heads = query.shape[1], key.shape[1]
    enable_gqa = heads != kv_heads
    if enable_gqa and heads & (heads - 1):  # the GQA kernels need a power-of-two head count
        key, value = _repeat_kv(key, heads // kv_heads), _repeat_kv(value, heads // kv_heads)
        enable_gqa = False
    if query.shape[2] < MIN_FLEX_QUERY_TOKENS or FALLBACK.broken:
        out = dense_attention(query, key, value, attention_mask, scaling, enable_gqa)
    else:
        out = _flex_or_dense(query, key, value, attention_mask, scaling, enable_gqa)
    return out.transpose(1, 2).contiguous(), None


def _use_wide(module: Any, query: Any, key: Any) -> bool:
    """Whether this call goes to :func:`streamtune.kernels.wide_attention.wide_attention`: a head wider than
    FlexAttention serves well, a sequence of at least the choice's ``wide_attention_min_tokens``, a causal module
    and no KV cache."""
    from streamtune.kernels.select import wide_attention_applies

    min_tokens = getattr(_STATE["choice"], "wide_attention_min_tokens", None)
    return (wide_attention_applies(query.shape[-1], query.shape[2], min_tokens) and query.shape[2] == key.shape[2]
            and getattr(module, "is_causal", True))


def _flex_or_dense(query: Any, key: Any, value: Any, block_mask: Any, scaling: float | None, enable_gqa: bool) -> Any:
    """The compiled FlexAttention kernel; if it cannot be compiled here, warn once and go dense from now on."""
    return FALLBACK.run(_flex, dense_attention, query, key, value, block_mask, scaling, enable_gqa)


def _flex(query: Any, key: Any, value: Any, block_mask: Any, scaling: float | None, enable_gqa: bool) -> Any:
    choice = _STATE["choice"]
    options = choice.kernel_options(query.shape[-1]) if choice is not None else None
    return _flex_kernel(query.device.type)(query, key, value, block_mask=block_mask, scale=scaling,
                                           enable_gqa=enable_gqa, kernel_options=options)


def dense_attention(query: Any, key: Any, value: Any, block_mask: Any, scaling: float | None, enable_gqa: bool) -> Any:
    """SDPA with the dense form of ``block_mask`` (short sequences and the no-kernel fallback).

    Sequences shorter than one mask block would take FlexAttention's decoding kernels, which do not
    lower for every training shape (measured: tiny Gemma4, 64 tokens, bf16, H200).
    """
    import torch
    from torch.nn.attention.flex_attention import create_mask

    count("flex_dense_fallback")
    mask = None
    if block_mask is not None:
        batch = block_mask.kv_num_blocks.shape[0]
        mask = create_mask(block_mask.mask_mod, batch, 1, query.shape[2], key.shape[2], device=query.device)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                            enable_gqa=enable_gqa)


def flex_block_mask(*args: Any, **kwargs: Any) -> Any:
    """transformers mask function: transformers' own ``flex_attention_mask`` (arguments passed through,
    their names differ across 5.x), i.e. the ``BlockMask`` of the mask function plus padding and offsets.

    On CUDA the mask is evaluated compiled, as transformers does; on the CPU uncompiled (compiling
    the mask takes over a minute there and changes no value).
    """
    from transformers import masking_utils as mu

    if _device_type(args, kwargs) == "cuda":
        return mu.flex_attention_mask(*args, **kwargs)
    compiled = mu.create_block_mask
    mu.create_block_mask = _uncompiled_block_mask
    try:
        return mu.flex_attention_mask(*args, **kwargs)
    finally:
        mu.create_block_mask = compiled


def _uncompiled_block_mask(*args: Any, **kwargs: Any) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    kwargs["_compile"] = False
    return create_block_mask(*args, **kwargs)


def _device_type(args: tuple, kwargs: dict) -> str:
    import torch

    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"]).type
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def _outside_compiled_regions(fn: Any) -> Any:
    """``fn`` run as eager code even when called from a compiled decoder layer (``train.compile_layers``).

    Problem: a compiled layer traced into FlexAttention and guarded on the mask functions transformers
    builds anew every forward; on the H200 it hit Dynamo's recompile limit and ran the layer eagerly behind
    its guards. Solution: the attention call is a graph break; the layer's other code stays compiled and
    FlexAttention runs through its own compiled kernel, as it does without ``compile_layers``.
    """
    import torch

    return torch.compiler.disable(fn, recursive=True)


def register_flex() -> None:
    """Register :data:`FLEX_NAME` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(FLEX_NAME, _outside_compiled_regions(flex_attention_forward))
    AttentionMaskInterface.register(FLEX_NAME, flex_block_mask)


def use_flex_attention(model: Any, choice: Any) -> str:
    """Point ``model`` (PEFT-wrapped or not) at FlexAttention; returns the previous implementation name.

    Raises:
        ValueError: the model's attention does not go through transformers' attention registry.
    """
    from streamtune.models import unwrap

    base = unwrap(model)
    if not getattr(base, "_supports_flex_attn", False):
        raise ValueError(f"{type(base).__name__} does not support FlexAttention; use train.kernels=eager")
    register_flex()
    _STATE["choice"] = choice
    FALLBACK.reset()
    previous = base.config._attn_implementation
    _set_implementation(base, FLEX_NAME)
    return previous


def _set_implementation(base: Any, name: str) -> None:
    configs = {id(base.config): base.config}
    for module in base.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
    for config in configs.values():
        config._attn_implementation = name


def restore_attention(model: Any, name: str) -> None:
    """Undo :func:`use_flex_attention` (``name``: what it returned)."""
    from streamtune.models import unwrap

    _set_implementation(unwrap(model), name)
