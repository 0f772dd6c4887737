"""Tiny checkpoints written to disk in-process (random weights, sharded into several files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from streamtune.models.build import build_empty, random_fill_
from streamtune.models.presets import preset_config, tiny_gemma4

SHARD_SIZE = "200KB"


def _randomize(model: Any, seed: int) -> None:
    # i.i.d. weights (random_fill_ repeats blocks) and non-trivial norms, so a swapped tensor shows
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05 + (1.0 if param.dim() == 1 else 0.0))


def save_preset(name: str, directory: Path, dtype: Any = torch.float32, seed: int = 0,
                shard_size: str = SHARD_SIZE) -> Path:
    """Save preset ``name`` with random weights to ``directory`` (several shards)."""
    model = build_empty(preset_config(name), dtype, device="cpu")
    random_fill_(model, seed)
    _randomize(model, seed)
    model.save_pretrained(str(directory), max_shard_size=shard_size)
    return directory


def gemma4_multimodal_config() -> Any:
    from transformers.models.gemma4.configuration_gemma4 import Gemma4Config, Gemma4VisionConfig

    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16, position_embedding_size=64)
    return Gemma4Config(text_config=tiny_gemma4().to_dict(), vision_config=vision.to_dict(), audio_config=None,
                        boi_token_id=1000, eoi_token_id=1001, image_token_id=1002, video_token_id=1003,
                        boa_token_id=1004, eoa_token_index=1005, audio_token_id=1006)


def save_gemma4_multimodal(directory: Path, seed: int = 0) -> Path:
    """A ``Gemma4ForConditionalGeneration`` checkpoint (text model under ``model.language_model.``)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(gemma4_multimodal_config())
    _randomize(model, seed)
    model.save_pretrained(str(directory), max_shard_size=SHARD_SIZE)
    return directory


def shard_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def weight_map(directory: Path) -> dict[str, str]:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]


def working_copy(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint ``pristine`` under ``tmp_path`` that a test may damage."""
    import shutil

    directory = tmp_path / pristine.name
    shutil.copytree(pristine, directory)
    return directory
