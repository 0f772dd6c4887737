"""Run as ``python -m tests.loading.rss_probe DIR CODEC``: load DIR through the engine, print RSS facts as JSON.

A separate process so ``VmHWM`` (the peak resident set of this process's memory, Linux) covers this load
only (``ru_maxrss`` would not do: it starts at the parent's RSS when forked).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from streamtune.hostmem import peak_rss_bytes, rss_bytes


def main(directory: str, codec: str) -> None:
    from types import SimpleNamespace

    from streamtune.loading import open_checkpoint
    from streamtune.models.adapters import decoder_layers
    from streamtune.models.build import causal_lm_class, resolve_config
    from streamtune.offload import place

    causal_lm_class(resolve_config(directory))  # imports the modeling code before the baseline
    baseline_bytes = rss_bytes()
    import_peak_bytes = peak_rss_bytes()
    if import_peak_bytes > baseline_bytes + (64 << 20):
        raise SystemExit(f"import peak {import_peak_bytes} far above the baseline {baseline_bytes}: "
                         "the measurement would be meaningless")
    started = time.perf_counter()
    opened = open_checkpoint(directory, torch.bfloat16, progress=False)
    opened.model.requires_grad_(False)
    memory = SimpleNamespace(stream="all", codec=codec, ring_slots=2, prefetch=1, gradient_checkpointing=False)
    placement = place(opened.model, opened.adapter, memory, "cpu", load_tensor=opened.load_tensor)
    stats = opened.finish()
    wall_s = time.perf_counter() - started
    layers = decoder_layers(opened.model)
    layer_params = {id(p) for p in layers.parameters()}
    other_bytes = sum(p.numel() * p.element_size() for p in opened.model.parameters() if id(p) not in layer_params)
    layer_bf16_bytes = max(sum(p.numel() * 2 for p in layer.parameters()) for layer in layers)
    largest_bytes = max(p.numel() * 2 for p in opened.model.parameters())
    print(json.dumps({
        "baseline_bytes": baseline_bytes,
        "peak_bytes": peak_rss_bytes(),
        "final_bytes": rss_bytes(),
        "host_pack_bytes": placement.engine.host_bytes, "other_bytes": other_bytes,
        "layer_bytes": layer_bf16_bytes, "largest_tensor_bytes": largest_bytes,
        "bytes_read": stats["bytes_read"], "read_gbps": stats["gbps"], "wall_s": wall_s,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
