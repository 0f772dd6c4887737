"""Model presets, architecture adapters and builders (no streaming knowledge here)."""

from streamtune.models.adapters import ArchAdapter, adapter_for, decoder, decoder_layers, lm_head, unwrap
from streamtune.models.presets import PRESETS, is_preset, preset_config

__all__ = [
    "ArchAdapter", "PRESETS", "adapter_for", "decoder", "decoder_layers", "is_preset", "lm_head",
    "preset_config", "unwrap",
]
