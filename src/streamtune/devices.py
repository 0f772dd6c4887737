"""The GPU this process runs on, as the planner needs it: a speed profile measured once per card and cached.

Problem: without a cached ``streamtune bench --link``, the planner used the rtx4090 defaults on any card
(on an H200 it predicted 3.1 s for a 0.78 s step). Solution: on CUDA, :func:`detect_link_profile` uses the
cached profile when it was measured on a card of the same name; otherwise it measures pinned H2D, matmul and
dequantisation speeds in a few seconds, caches them, and falls back to the named profile matching the
card's name (with its real memory) if measuring fails. The planner itself never touches CUDA.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from streamtune.errors import InputError

GIB = 1 << 30
# The planner's compute model was fitted to measured steps with this share of the 8192^3 bf16 matmul
# speed (decoder layers reach less than one big square product).
PLANNER_MATMUL_FRACTION = 0.8


def measure_h2d(nbytes: int = GIB, pinned: bool = True, repeats: int = 5, device: Any = "cuda") -> float:
    """Host-to-device copy speed in GB/s (best of ``repeats``)."""
    import torch

    from streamtune.offload.host import alloc_host_buffer

    # not torch's caching host allocator: it would keep the probe's pinned block for the whole run
    host = alloc_host_buffer(nbytes, pin=pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def measure_matmul_tflops(n: int = 8192, repeats: int = 10, device: Any = "cuda") -> float:
    """Achieved bf16 matmul TFLOP/s on an n x n x n product."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def quick_link(device: Any) -> dict[str, Any]:
    """A few seconds' measurement of ``device``: what the planner needs (raw speeds, not scaled)."""
    import torch

    from streamtune.quant.bench import DEFAULT_DECODE_NUMEL, benchmark_decode

    props = torch.cuda.get_device_properties(device)
    decode = benchmark_decode(device, repeats=3)  # the bench's size: a 32 MB decode timed its launches
    raw = {
        "gpu_name": props.name, "gpu_memory_bytes": int(props.total_memory),
        "h2d_gbps": measure_h2d(256 << 20, pinned=True, repeats=3, device=device),
        "matmul_tflops": measure_matmul_tflops(repeats=5, device=device),
        "dequant_gbps": {k: v for k, v in decode.items() if k != "bf16"}, "decode_numel": DEFAULT_DECODE_NUMEL,
    }
    torch.cuda.empty_cache()  # about 1 GB of test tensors: give it back before the run places its layers
    return raw


def detect_link_profile(device: Any = None, path: str | Path | None = None, measure: bool = True) -> Any:
    """The speed profile of the CUDA ``device`` (default: the current one) for the planner.

    The cached profile when its card has this card's name (and its decode speeds were timed on
    ``DECODE_TIMING_NUMEL`` elements, else it is measured again); else (``measure``) a quick measurement, cached;
    else the named profile closest to the card's name, with the card's real memory. The profile's
    ``source`` says which.

    Raises:
        RuntimeError: CUDA is not available.
    """
    import torch

    from streamtune.plan.profiles import (DECODE_TIMING_NUMEL, closest_named, load_link_profile, replace,
                                          save_link_profile)

    if not torch.cuda.is_available():
        raise RuntimeError("detect_link_profile needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    props = torch.cuda.get_device_properties(device)
    cached = load_link_profile(path)
    why = "once per card"
    if cached is not None and cached.gpu_name == props.name:
        if cached.decode_numel == DECODE_TIMING_NUMEL or not measure:
            return cached
        why = "its cached decode speeds were timed on a smaller tensor"
    if measure:
        try:
            print(f"measuring the speeds of {props.name} for the planner ({why}) ...", file=sys.stderr)
            raw = quick_link(device)
            saved = save_link_profile(raw["h2d_gbps"], raw["matmul_tflops"] * PLANNER_MATMUL_FRACTION,
                                      raw["gpu_name"], raw["dequant_gbps"], gpu_memory_bytes=raw["gpu_memory_bytes"],
                                      path=path, decode_numel=raw.get("decode_numel"))
            return load_link_profile(saved)
        except (RuntimeError, OSError) as exc:  # out of memory, unwritable cache: plan with the defaults
            print(f"measuring {props.name} failed ({exc}); planning with its named profile", file=sys.stderr)
    named = closest_named(props.name)
    return replace(named, gpu_name=props.name, gpu_memory_bytes=int(props.total_memory),
                   source=f"default {named.gpu_name} (detected {props.name})")


def plan_on_device(cfg: Any, device: Any, local_ranks: int = 1) -> Any:
    """The plan of the run ``cfg`` on the CUDA ``device``, checked, with the allocator capped.

    The card's own profile (:func:`detect_link_profile`) gives the speeds, its free memory the default
    GPU budget and the machine's available RAM the default host budget; ``memory.gpu_budget``, when set,
    also caps this process's allocator on ``device``. ``train`` and ``generate``/``eval`` plan this way.

    Raises:
        InputError: the run would not fit (the message holds the plan and what to lower).
    """
    import psutil
    import torch

    from streamtune.config import parse_bytes
    from streamtune.plan import plan_for_run

    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    plan = plan_for_run(cfg, link=detect_link_profile(device), gpu_budget_bytes=free_bytes,
                        host_budget_bytes=psutil.virtual_memory().available, local_ranks=local_ranks)
    plan.check()
    if cfg.memory.gpu_budget:
        budget = parse_bytes(cfg.memory.gpu_budget)
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total_bytes), device)
    return plan


def resolve_device(name: str) -> Any:
    """``train.device`` as a torch device; a CUDA device always carries its index (the current device).

    Raises:
        InputError: cuda asked for but not available.
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device: cuda asked for, but torch sees no CUDA device; use train.device=cpu or auto")
    if name == "cuda":
        # CUDA calls such as set_per_process_memory_fraction need the index: never hand out a bare "cuda"
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def resolve_dtype(name: str, device: Any) -> Any:
    """``model.dtype`` as a torch dtype: auto = bfloat16 on cuda, float32 on cpu."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
