"""The layer split of a training run (``train.devices``): its devices, its plan, its placement.

One process computes decoder-layer ranges on several devices (:mod:`streamtune.offload.split`). On CUDA the
split point and each GPU's resident/streamed layers come from :func:`streamtune.plan.multi_gpu.plan_split`,
with each card's own speed profile and budget (``memory.gpu_budgets``, default: its free memory), and each
card's allocator is capped to its budget. On the CPU (tests) the split is even (or ``memory.layer_split``)
and ``memory.stream`` decides the streamed layers.
"""

from __future__ import annotations

from typing import Any

from streamtune.errors import InputError


def split_devices(cfg: Any) -> list[Any]:
    """``train.devices`` as torch devices (empty: no layer split).

    Raises:
        InputError: a CUDA device that torch does not see, or a layer split under torchrun.
    """
    import os

    import torch

    if not cfg.train.devices:
        return []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("train.devices: a layer split runs in one process; launch `streamtune train` without "
                         "torchrun, or leave train.devices empty for data parallel")
    devices = [torch.device(d) for d in cfg.train.devices]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [str(d) for d in devices if d.type == "cuda" and d.index >= count]
    if missing:
        raise InputError(f"train.devices: {missing} not found (torch sees {count} CUDA device(s)); name devices "
                         f"cuda:0..cuda:{max(0, count - 1)}")
    return devices


def plan_split_on_devices(cfg: Any, devices: list[Any]) -> dict[str, Any]:
    """The planner's layer split for ``cfg`` on these GPUs; caps each GPU's allocator to its budget.

    Raises:
        InputError: no split fits (the message says what to lower), or a bad ``memory.layer_split``.
    """
    import sys

    import torch

    from streamtune.config import parse_bytes, parse_layer_split
    from streamtune.devices import detect_link_profile
    from streamtune.plan.multi_gpu import plan_split
    from streamtune.plan.timing import cost_model

    mem = cfg.memory
    totals = [torch.cuda.mem_get_info(d) for d in devices]
    budgets = ([parse_bytes(b) for b in mem.gpu_budgets] if mem.gpu_budgets else [free for free, _ in totals])
    plan = plan_split(
        cfg.model.name, [detect_link_profile(d) for d in devices], budgets, parse_layer_split(mem.layer_split),
        micro_batches=cfg.train.grad_accum, codec=mem.codec, tokens=cfg.train.batch_size * cfg.data.seq_len,
        lora_rank=cfg.lora.rank, lora_targets=cfg.lora.targets, lora_target_parameters=list(cfg.lora.target_parameters),
        gradient_checkpointing=mem.gradient_checkpointing, stream=mem.stream, ring_slots=mem.ring_slots,
        loss_chunk_tokens=cfg.train.loss_chunk_tokens, trust_remote_code=cfg.model.trust_remote_code,
        kernels=cost_model(cfg.train.kernels, cfg.train.compile_layers))
    if mem.gpu_budgets:
        for device, budget, (_, total) in zip(devices, budgets, totals):
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    print(describe_split(plan, devices), file=sys.stderr)
    return plan


def cpu_split(cfg: Any, num_layers: int, num_devices: int) -> dict[str, Any]:
    """Boundaries and streamed layers of a layer split over CPU devices (no planner).

    Raises:
        InputError: ``memory.layer_split`` does not fit the model's decoder layers.
    """
    from streamtune.config import parse_layer_split
    from streamtune.offload.split import layer_ranges

    boundaries = parse_layer_split(cfg.memory.layer_split)
    if boundaries is None:
        boundaries = [num_layers * d // num_devices for d in range(1, num_devices)]
    try:
        ranges = layer_ranges(num_layers, boundaries)
    except ValueError as exc:
        raise InputError(f"memory.layer_split: {exc} (the model has {num_layers} decoder layers)") from exc
    stream_all = cfg.memory.stream == "all"
    return {"boundaries": boundaries, "gpus": [{"streamed_indices": list(range(a, b)) if stream_all else []}
                                               for a, b in ranges]}


def place_layer_split(model: Any, cfg: Any, devices: list[Any], plan: dict[str, Any] | None, load_tensor: Any = None,
                      pack_cache: Any = None) -> Any:
    """Place the LoRA-wrapped CPU ``model`` over ``devices`` by ``plan`` (from :func:`plan_split_on_devices`;
    None on CPU devices: :func:`cpu_split`).

    Raises:
        InputError: the split does not fit the model.
    """
    from streamtune.models.adapters import decoder_layers
    from streamtune.offload.split import place_split

    if plan is None:
        plan = cpu_split(cfg, len(decoder_layers(model)), len(devices))
    if plan["boundaries"][-1] >= len(decoder_layers(model)):
        raise InputError(f"memory.layer_split: {plan['boundaries']} must be below the model's "
                         f"{len(decoder_layers(model))} decoder layers")
    return place_split(model, cfg.memory, devices, plan["boundaries"], [g["streamed_indices"] for g in plan["gpus"]],
                       plan=plan, load_tensor=load_tensor, pack_cache=pack_cache)


def describe_split(plan: dict[str, Any], devices: list[Any]) -> str:
    """One line for the run summary: the ranges, streamed layers and predicted step time per device."""
    edges = [*plan["boundaries"]]
    parts = []
    for index, (device, gpu) in enumerate(zip(devices, plan["gpus"])):
        start = 0 if index == 0 else edges[index - 1]
        stop = edges[index] if index < len(edges) else None
        span = f"{start}-{stop - 1}" if stop is not None else f"{start}-"
        parts.append(f"{device}: layers {span}, {len(gpu['streamed_indices'])} streamed")
    predicted = f"; predicted {plan['step_seconds']:.2f} s/step" if "step_seconds" in plan else ""
    return "layer split: " + "; ".join(parts) + predicted
