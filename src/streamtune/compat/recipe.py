"""The stock recipe, for tests and ``benchmarks/stock_recipe.py``.

transformers model + accelerate ``device_map`` CPU offload + peft LoRA on every attention/MLP
projection + gradient checkpointing, trained a few steps; optionally compared with the same model
resident (same weights, same LoRA init, same batches).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from streamtune.compat.offload_lora import LORA_TARGETS


@dataclass
class RecipeResult:
    """Outcome of one stock-recipe run.

    Attributes:
        ok: every step ran.
        error: first line of the exception that stopped it ("" when ok).
        losses: loss per step.
        step_seconds: wall time per step.
        num_offloaded_layers: decoder layers behind an offload hook.
        num_trainable: trainable LoRA parameters (elements).
        max_grad_rel_diff: max over LoRA tensors of |g - g_ref| / |g_ref| at step 1 (None: not compared).
        peak_gpu_bytes: torch.cuda.max_memory_allocated (None on CPU).
    """

    ok: bool
    error: str = ""
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    num_offloaded_layers: int = 0
    num_trainable: int = 0
    max_grad_rel_diff: float | None = None
    peak_gpu_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def seed_lora_(model: Any, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic LoRA values by parameter name (B non-zero so step-1 gradients reach A)."""
    import zlib

    import torch

    for name, param in model.named_parameters():
        if "lora_" not in name or param.device.type == "meta":
            continue
        gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        with torch.no_grad():
            param.copy_((torch.randn(param.shape, generator=gen) * std).to(param.dtype))


def batches(num_steps: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (batch_size, seq_len), generator=gen) for _ in range(num_steps)]


def offload(model: Any, device: str, max_memory: dict | None, offloaded: tuple[int, ...] | None) -> int:
    """Offload part of ``model`` the stock way; returns the number of offloaded decoder layers."""
    from accelerate import dispatch_model, infer_auto_device_map

    from streamtune.compat.offload_lora import offload_device_map, offload_layers

    if device == "cpu":
        offload_layers(model, offloaded or (1, 2))
        return len(offloaded or (1, 2))
    if max_memory is not None:
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    else:
        device_map = offload_device_map(model, device, offloaded or (1, 2))
    main = next(v for v in device_map.values() if v not in ("cpu", "disk"))
    dispatch_model(model, device_map=device_map, main_device=main)
    return sum(1 for k, v in device_map.items() if ".layers." in f"{k}." and v == "cpu")


def run_recipe(build: Callable[[], Any], device: str, *, offloaded: tuple[int, ...] | None = None,
               max_memory: dict | None = None, num_steps: int = 4, batch_size: int = 2, seq_len: int = 32,
               lr: float = 1e-2, rank: int = 8, reference: dict | None = None) -> tuple[RecipeResult, dict]:
    """Train a few LoRA steps with the stock recipe (offloaded when ``offloaded``/``max_memory`` given).

    Args:
        build: returns a fresh model on the CPU (same seed every call).
        device: "cpu" or "cuda[:i]"; the execution device.
        offloaded: decoder layers to offload (with ``max_memory`` None).
        max_memory: accelerate ``max_memory`` for ``infer_auto_device_map`` (GPU runs).
        reference: step-1 LoRA gradients of a resident run to compare with.

    Returns:
        the result and this run's step-1 LoRA gradients (name -> CPU tensor).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = build()
    result = RecipeResult(ok=False)
    resident = offloaded is None and max_memory is None
    if resident:
        model.to(device)
    else:
        result.num_offloaded_layers = offload(model, device, max_memory, offloaded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_* in 5.24
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    grads: dict[str, Any] = {}
    try:
        peft_model = get_peft_model(model, config)
        seed_lora_(peft_model)
        grads = _train(peft_model, result, device, num_steps, batches(1, batch_size, seq_len,
                                                                        model.config.vocab_size)[0], lr)
        result.ok = True
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if device.startswith("cuda"):
        result.peak_gpu_bytes = torch.cuda.max_memory_allocated()
    if reference and grads:
        result.max_grad_rel_diff = grad_rel_diff(grads, reference)
    return result, grads


def _train(peft_model: Any, result: RecipeResult, device: str, num_steps: int, batch: Any, lr: float) -> dict:
    """AdamW steps on one repeated batch; fills ``result`` and returns the step-1 LoRA gradients."""
    import torch

    params = [p for p in peft_model.parameters() if p.requires_grad]
    result.num_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr)
    grads: dict[str, Any] = {}
    for step in range(num_steps):
        start = time.perf_counter()
        ids = batch.to(device)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = _lora_grads(peft_model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result.step_seconds.append(time.perf_counter() - start)
        result.losses.append(float(loss.detach().float().cpu()))
    return grads


def _lora_grads(model: Any) -> dict[str, Any]:
    return {n: (p.grad.detach().float().cpu().clone() if p.grad is not None else None)
            for n, p in model.named_parameters() if "lora_" in n}


def grad_rel_diff(grads: dict[str, Any], reference: dict[str, Any]) -> float:
    """Max relative difference of matching gradients; inf when one is missing or on meta."""
    worst = 0.0
    for name, ref in reference.items():
        got = grads.get(name)
        if ref is None:
            continue
        if got is None or got.device.type == "meta" or got.shape != ref.shape:
            return float("inf")
        scale = float(ref.norm()) or 1.0
        worst = max(worst, float((got - ref).norm()) / scale)
    return worst
