"""Named model shapes: tiny ones for tests and the quickstart, real ones for planning and benchmarks.

A preset is an HF config built in-process; weights are random (see ``streamtune.models.build``).
"""

from __future__ import annotations

from typing import Any, Callable

TINY_VOCAB_SIZE = 1024


def _gemma4(**overrides: Any) -> Any:
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    return Gemma4TextConfig(**overrides)


def tiny_gemma4() -> Any:
    """Four layers of the real Gemma4 MoE block (fused experts, k=v global attention, softcap)."""
    return _gemma4(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, enable_moe_block=True, num_experts=8,
        top_k_experts=2, moe_intermediate_size=32, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=TINY_VOCAB_SIZE, final_logit_softcapping=30.0, sliding_window=64,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )


def gemma4_26b_a4b() -> Any:
    """google/gemma-4-26B-A4B text model: 30 layers, 128 experts top-8, 25.2 B parameters."""
    return _gemma4(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
        num_global_key_value_heads=2, attention_k_eq_v=True, enable_moe_block=True, num_experts=128,
        top_k_experts=8, moe_intermediate_size=704, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=262144, final_logit_softcapping=30.0, sliding_window=1024,
    )


def _qwen3_moe(**overrides: Any) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**overrides)


def tiny_qwen3_moe() -> Any:
    return _qwen3_moe(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )


def qwen3_moe_30b_a3b() -> Any:
    """Qwen/Qwen3-30B-A3B: 48 layers, 128 experts top-8."""
    return _qwen3_moe(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, max_position_embeddings=40960, rope_theta=1e6,
    )


def _llama(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**overrides)


def tiny_llama() -> Any:
    return _llama(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )


def llama_8b() -> Any:
    """Llama-3.1-8B shape."""
    return _llama(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=5e5,
    )


def tiny_mixtral() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )


PRESETS: dict[str, Callable[[], Any]] = {
    "tiny-gemma4": tiny_gemma4,
    "tiny-qwen3-moe": tiny_qwen3_moe,
    "tiny-llama": tiny_llama,
    "tiny-mixtral": tiny_mixtral,
    "gemma4-26b-a4b": gemma4_26b_a4b,
    "qwen3-moe-30b-a3b": qwen3_moe_30b_a3b,
    "llama-8b": llama_8b,
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def preset_config(name: str) -> Any:
    """The HF config of a preset.

    Raises:
        KeyError: unknown preset (the message lists the known ones).
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
