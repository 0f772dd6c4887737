"""Run as ``python -m tests.models.lazy_probe CODEC``: pack a lazily filled ~300 MB model through the
engine, print RSS facts as JSON (a separate process, so ``VmHWM`` covers this build only)."""

from __future__ import annotations

import json
import sys

import torch

from streamtune.hostmem import peak_rss_bytes, rss_bytes


def probe_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8)


def main(codec: str) -> None:
    from types import SimpleNamespace

    from streamtune.models.adapters import decoder_layers
    from streamtune.models.build import LazyPreset, causal_lm_class
    from streamtune.offload import place

    config = probe_config()
    causal_lm_class(config)  # imports the modeling code before the baseline
    baseline_bytes = rss_bytes()
    lazy = LazyPreset(config, torch.bfloat16)
    lazy.model.requires_grad_(False)
    memory = SimpleNamespace(stream="all", codec=codec, ring_slots=2, prefetch=1, gradient_checkpointing=False)
    placement = place(lazy.model, lazy.adapter, memory, "cpu", load_tensor=lazy.load_tensor)
    layers = decoder_layers(lazy.model)
    layer_params = {id(p) for p in layers.parameters()}
    print(json.dumps({
        "baseline_bytes": baseline_bytes, "peak_bytes": peak_rss_bytes(), "final_bytes": rss_bytes(),
        "host_pack_bytes": placement.engine.host_bytes,
        "other_bytes": sum(p.numel() * p.element_size() for p in lazy.model.parameters() if id(p) not in layer_params),
        "model_bf16_bytes": sum(p.numel() * 2 for p in lazy.model.parameters()),
        "largest_tensor_bytes": max(p.numel() * 2 for p in lazy.model.parameters()),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
