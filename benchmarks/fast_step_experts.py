"""The ``experts`` piece of benchmarks/fast_step.py: one experts module of a preset with expert LoRA.

PEFT ``target_parameters`` (stock: W + scale * B@A rebuilt per forward, then transformers'
``grouped_mm`` experts) against :mod:`streamtune.kernels.experts` (frozen grouped product plus a
rank-r grouped product), forward + backward at each token count: median time, peak memory above
the inputs, host syncs counted by ``torch.cuda.set_sync_debug_mode`` (CUDA), output relative
error and per-LoRA-tensor gradient cosine. LoRA weights are fp32 (as ``attach_lora`` makes
them), the frozen experts in the compute dtype. Runs on the CPU too (tests use tiny shapes).
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable

import torch

EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def experts_class(config: Any) -> Any:
    """The transformers experts module class of a preset's config (fused 3-D expert parameters)."""
    if config.model_type.startswith("gemma4"):
        from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

        return Gemma4TextExperts
    if config.model_type == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        return Qwen3MoeExperts
    if config.model_type == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        return MixtralExperts
    raise ValueError(f"experts piece: no fused experts module known for model_type {config.model_type!r}")


def top_k(config: Any) -> int:
    for name in ("top_k_experts", "num_experts_per_tok"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError("experts piece: the config names no top-k")


def build_experts(config: Any, rank: int, device: torch.device, dtype: torch.dtype) -> Any:
    """A random experts module (``config._experts_implementation`` = grouped_mm) with PEFT expert LoRA."""
    from peft import LoraConfig, inject_adapter_in_model

    config._experts_implementation = "grouped_mm"
    gen = torch.Generator(device=device).manual_seed(0)
    holder = torch.nn.Module()
    with torch.device(device):
        holder.experts = experts_class(config)(config)
    with torch.no_grad():
        for p in holder.experts.parameters():
            p.normal_(0, 0.02, generator=gen)
    holder = holder.to(dtype=dtype).requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_parameters=EXPERT_PARAMS), holder)
    with torch.no_grad():
        for name, p in holder.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
                if "lora_B" in name:
                    p.normal_(0, 0.01, generator=gen)
    return holder.experts


def routed_inputs(config: Any, tokens: int, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """Hidden states and a softmax top-k routing of random logits (every expert hit at these sizes)."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, config.hidden_size, generator=gen).to(device, dtype)
    probs = torch.randn(tokens, config.num_experts if hasattr(config, "num_experts") else config.num_local_experts,
                        generator=gen).softmax(-1)
    weights, index = torch.topk(probs, top_k(config), dim=-1)
    return hidden, index.to(device), (weights / weights.sum(-1, keepdim=True)).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Synchronising CUDA calls made by ``fn`` (``set_sync_debug_mode`` warnings); None off CUDA."""
    if device.type != "cuda":
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _cosine(a: Any, b: Any) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def run_variant(module: Any, inputs: tuple, device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """Forward + backward of ``module`` on ``inputs``: time, peak, syncs, output and LoRA grads."""
    hidden, index, weights = inputs
    lora = {n: p for n, p in module.named_parameters() if p.requires_grad}
    x = hidden.clone().requires_grad_()

    def step() -> Any:
        for p in lora.values():
            p.grad = None
        x.grad = None
        out = module(x, index, weights)
        out.float().square().mean().backward()
        return out.detach()

    out = step()
    syncs = host_syncs(step, device)
    _sync(device)
    base_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        out = step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base_bytes if device.type == "cuda" else None
    return {"s": statistics.median(times), "peak_extra_bytes": peak, "host_syncs": syncs, "out": out,
            "grads": {n: p.grad.clone() for n, p in lora.items()}}


def compare_experts(config: Any, tokens: int, rank: int, device: torch.device, dtype: torch.dtype,
                    warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """PEFT target_parameters (eager) vs the grouped low-rank experts forward (fast) at ``tokens``."""
    from streamtune.kernels import calls, reset, select_for_device
    from streamtune.kernels.experts import restore_stock_expert_lora, use_fast_expert_lora

    module = build_experts(config, rank, device, dtype)
    inputs = routed_inputs(config, tokens, device, dtype)
    eager = run_variant(module, inputs, device, warmup, repeats)
    route_name = select_for_device("auto", device, dtype).expert_lora
    use_fast_expert_lora(module, route_name)
    reset()
    fast = run_variant(module, inputs, device, warmup, repeats)
    fast["calls"] = calls("expert_lora")
    restore_stock_expert_lora(module)
    ref_out, out = eager.pop("out").float(), fast.pop("out").float()
    cosines = {n: _cosine(g, eager["grads"][n]) for n, g in fast.pop("grads").items()}
    eager.pop("grads")
    return {"tokens": tokens, "route": route_name, "eager": eager, "fast": fast,
            "out_rel_err": float((out - ref_out).norm() / ref_out.norm()),
            "grad_cosine": cosines, "grad_cosine_min": min(cosines.values()), "speedup": eager["s"] / fast["s"]}


def piece_experts(args: Any) -> dict[str, Any]:
    """The piece for benchmarks/fast_step.py: the preset's experts module at each ``--expert-tokens``."""
    from streamtune.models.presets import preset_config

    config = preset_config(args.preset)
    runs = [compare_experts(config, int(t), args.expert_rank, torch.device("cuda"), torch.bfloat16,
                            args.warmup, args.repeats) for t in str(args.expert_tokens).split(",")]
    torch.cuda.empty_cache()
    last = runs[-1]
    return {"runs": runs, "eager": last["eager"], "fast": last["fast"], "loss_rel_err": last["out_rel_err"],
            "grad_cosine_min": min(r["grad_cosine_min"] for r in runs), "speedup": last["speedup"]}
