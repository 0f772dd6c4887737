"""Shared pieces of the device benchmarks: model, LoRA, batch, timed steps, link measurements.

Every benchmark reports ratios measured in one run on one card; nothing here runs in CI.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from streamtune.devices import measure_h2d, measure_matmul_tflops

GIB = 1 << 30


@dataclass
class StepResult:
    """One variant at one token count."""

    variant: str
    tokens: int
    step_s: float | None = None
    tok_s: float | None = None
    gpu_peak_bytes: int | None = None
    h2d_bytes: float | None = None
    h2d_gbps: float | None = None
    copy_wait_s: float | None = None
    loss: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_config(preset: str, num_layers: int | None) -> Any:
    """The preset's HF config, optionally cut to ``num_layers`` decoder layers (for smoke runs)."""
    from streamtune.models.presets import preset_config

    config = preset_config(preset)
    if num_layers:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers - 1] + ["full_attention"]
    return config


def build_random_model(config: Any, seed: int = 0) -> Any:
    """A bf16 model of ``config`` in host RAM, filled at memcpy speed (see models.build.random_fill_)."""
    from streamtune.models.build import build_empty, random_fill_

    start = time.perf_counter()
    model = build_empty(config, torch.bfloat16, device="cpu")
    random_fill_(model, seed)
    model.tie_weights()
    print(f"[bench] built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return model


def lora_targets_regex(layers: list[int] | None = None) -> str:
    """Attention + dense MLP of the given decoder layers (all when None)."""
    index = r"\d+" if layers is None else "(" + "|".join(str(i) for i in layers) + ")"
    return rf".*layers\.{index}\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


def attach_lora(model: Any, rank: int, layers: list[int] | None = None) -> Any:
    """Stock PEFT LoRA (r, alpha 2r) on attention + dense MLP."""
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=lora_targets_regex(layers))
    model = peft.get_peft_model(model, cfg)
    model.train()
    return model


def random_batch(tokens: int, vocab: int, device: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """One sequence of random token ids on ``device``, moved as training moves a batch: with the loss positions
    from the CPU labels, so neither the loss nor its token count waits for the GPU."""
    from streamtune.train.support import to_device

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, tokens), generator=gen)
    return to_device({"input_ids": ids, "labels": ids.clone()}, device)


WARMUP_STEPS = 2


def timed_steps(step_fn: Any, num_steps: int, num_warmup: int = WARMUP_STEPS, gc_every_steps: int = 0,
                stats: dict[str, Any] | None = None) -> tuple[float, float, list[float]]:
    """Run ``step_fn()`` (returns the loss) warmup + timed times.

    Two warm-up steps: the first compiles the forward and backward graphs and creates the optimizer state;
    the second is the first that runs as every later one does. Garbage collection between steps follows
    ``train.gc_every_steps`` as training does (:class:`streamtune.stepgc.StepCollector`; its collections are
    outside the timed steps, as they are between training steps); ``stats`` receives the seconds Python's
    collector spent inside the timed steps (``gc_in_steps_s``) and how many collections that was.

    Returns:
        (median seconds of the timed steps, last loss, seconds of every step, warm-ups first).
    """
    from streamtune.stepgc import GcPauses, StepCollector

    times, loss = [], float("nan")
    collector, pauses = StepCollector(gc_every_steps), GcPauses()
    try:
        for index in range(num_warmup + num_steps):
            torch.cuda.synchronize()
            with pauses if index >= num_warmup else contextlib.nullcontext():
                start = time.perf_counter()
                loss = float(step_fn())
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            collector.after_step(index + 1)
    finally:
        collector.close()
    if stats is not None:
        stats.update(gc_in_steps_s=round(pauses.seconds, 4), gc_in_steps=pauses.count)
    return statistics.median(times[num_warmup:]), loss, times


def cap_gpu_memory(budget_bytes: int | None) -> None:
    """Cap this process's allocator at ``budget_bytes`` (None: the whole card)."""
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = 1.0 if budget_bytes is None else min(1.0, budget_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    torch.cuda.empty_cache()


def measure_link() -> dict[str, Any]:
    """What ``streamtune bench --link`` measures and caches for the planner."""
    from streamtune.quant.bench import DEFAULT_DECODE_NUMEL, benchmark_decode

    decode = benchmark_decode("cuda")
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu_name": props.name,
        "gpu_memory_bytes": props.total_memory,
        "h2d_gbps": measure_h2d(pinned=True),
        "h2d_pageable_gbps": measure_h2d(pinned=False, repeats=2),
        "matmul_tflops": measure_matmul_tflops(),
        "dequant_gbps": {k: v for k, v in decode.items() if k != "bf16"},
        "decode_numel": DEFAULT_DECODE_NUMEL,
    }
