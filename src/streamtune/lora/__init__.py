"""LoRA adapters: attach PEFT LoRA, save in PEFT format, rebuild the base model, merge.

An adapter directory written by streamtune is a stock PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``) plus the tokenizer and ``streamtune.json``, which records how to
rebuild the exact base model (preset name and seed, or checkpoint directory, and dtype).
"""

from streamtune.lora.adapter import (
    BASE_INFO_FILE,
    attach_lora,
    build_base_for_adapter,
    load_trainable_state,
    read_base_info,
    save_adapter,
    trainable_state,
)
from streamtune.lora.merge import merge

__all__ = [
    "BASE_INFO_FILE", "attach_lora", "build_base_for_adapter", "load_trainable_state", "merge", "read_base_info", "save_adapter",
    "trainable_state",
]
