"""The timed variants of ``streamtune bench``, each run in its own process by ``bench.run``.

- ``streamtune``: our engine under the GPU cap, placement from the planner at each token count;
  then ``resident``: the same weights decoded onto the uncapped GPU (no second host copy).
- ``stock``: the stock step (transformers + PEFT + HF gradient checkpointing and loss) on the uncapped GPU
  with the whole bf16 model resident: what a card that holds the model runs without streamtune.
- ``accelerate``: the stock recipe, transformers + accelerate device_map CPU offload + peft LoRA
  (on the GPU-resident layers only: LoRA on an offloaded layer crashes, see compat N1/P8) +
  gradient checkpointing, HF's own loss.
- ``fsdp2``: PyTorch FSDP2 ``fully_shard`` per decoder layer with ``CPUOffloadPolicy(pin_memory=True)``
  on one GPU, LoRA on every layer, HF gradient checkpointing and HF's own (unchunked) loss.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from streamtune.bench.common import (
    GIB, WARMUP_STEPS, StepResult, attach_lora, bench_config, build_random_model, cap_gpu_memory, random_batch,
    timed_steps,
)
from streamtune.hostmem import peak_rss_bytes, rss_bytes


def _adamw(model: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def _our_step(model: Any, adapter: Any, batch: dict, opt: Any, chunk_tokens: int, kernels: Any = None) -> Any:
    from streamtune.train.loss import batch_loss_tokens, lm_loss_sum

    loss = lm_loss_sum(model, adapter, batch, chunk_tokens, kernels) / max(1, batch_loss_tokens(batch))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _hf_step(model: Any, batch: dict, opt: Any) -> Any:
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _run_lengths(name: str, tokens_list: list[int], num_steps: int, step_for: Any, before: Any = None,
                 after: Any = None, gc_every_steps: int = 0) -> list[StepResult]:
    """Time ``step_for(tokens)`` at each length; ``before``/``after(tokens)`` return extra fields;
    ``gc_every_steps``: garbage collection between steps as ``train.gc_every_steps`` (0: Python's own)."""
    results = []
    for tokens in tokens_list:
        result = StepResult(name, tokens)
        try:
            extra = before(tokens) if before else {}
            torch.cuda.reset_peak_memory_stats()
            retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
            gc_stats: dict[str, Any] = {}
            step_s, loss, times = timed_steps(step_for(tokens), num_steps, gc_every_steps=gc_every_steps,
                                              stats=gc_stats)
            result.step_s, result.tok_s, result.loss = step_s, tokens / step_s, loss
            result.extra["step_times_s"] = [round(t, 4) for t in times]
            result.extra.update(gc_stats, gc_every_steps=gc_every_steps)
            # near the cap the caching allocator frees its cache and retries (a device-wide sync each time)
            result.extra["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries
            result.extra["gpu_reserved_peak_bytes"] = torch.cuda.max_memory_reserved()
            result.gpu_peak_bytes = torch.cuda.max_memory_allocated()
            result.extra.update(extra or {})
            result.extra.update(after(tokens) if after else {})
        except torch.OutOfMemoryError as exc:
            result.error = "OOM: " + str(exc).splitlines()[0][:160]
        except Exception as exc:  # a baseline that crashes is a result, not a benchmark failure
            result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        torch.cuda.empty_cache()
        print(f"[bench] {result.to_dict()}", flush=True)
        results.append(result)
    return results


def run_streamtune(args: Any) -> list[StepResult]:
    """Our engine under the cap at each length, then the same model resident on the uncapped GPU."""
    from streamtune.kernels.counters import CALLS
    from streamtune.kernels.counters import reset as reset_counters
    from streamtune.models.adapters import adapter_for
    from streamtune.models.build import LazyPreset
    from streamtune.offload import StreamEngine
    from streamtune.plan import make_plan

    config = bench_config(args.model, args.num_layers)
    adapter = adapter_for(config)
    # layers are filled tensor by tensor while they are packed: host RAM peaks near the packed size
    lazy = LazyPreset(config, torch.bfloat16)
    model = attach_lora(lazy.model, args.lora_rank)
    kernels, applied = _fast_kernels(model, getattr(args, "kernels", "eager"))
    budget = int(args.gpu_budget_gib * GIB)
    cap_gpu_memory(budget)
    pack_started = time.perf_counter()
    engine = StreamEngine(model, "cuda", streamed=list(range(config.num_hidden_layers)), codec=args.codec,
                          num_slots=args.ring_slots, prefetch=args.prefetch, load_tensor=lazy.load_tensor)
    host = {"pack_s": time.perf_counter() - pack_started, "host_bytes": engine.host_bytes,
            "host_rss_bytes": rss_bytes(), "host_peak_rss_bytes": peak_rss_bytes(),
            "kernels": {**kernels.describe(), **applied}}
    print(f"[bench] filled and packed {engine.host_bytes / 1e9:.2f} GB of {args.codec} layers in "
          f"{host['pack_s']:.1f} s, process RSS {host['host_rss_bytes'] / 1e9:.2f} GB, "
          f"peak {host['host_peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    opt = _adamw(model)
    link = args.link_profile

    def place(tokens: int) -> dict:
        plan = make_plan(config, codec=args.codec, tokens=tokens, lora_rank=args.lora_rank, lora_targets=None,
                         gpu_budget_bytes=budget, ring_slots=args.ring_slots, link=link,
                         loss_chunk_tokens=args.loss_chunk_tokens, suggest=False,
                         kernels=getattr(args, "kernels", "eager"))
        engine.set_streamed(plan.streamed_indices)
        engine.step_metrics()
        reset_counters()  # the fast pieces this length runs, counted over its warm-up and timed steps
        return {**host, "num_streamed": len(plan.streamed_indices), "predicted_step_s": plan.step_seconds,
                "active_params": plan.active_params,
                "predicted_gpu_peak_bytes": plan.gpu_peak_bytes, "predicted_tensor_peak_bytes": plan.tensor_peak_bytes,
                "limited_by": plan.limited_by,
                "plan_fits": plan.fits}

    def step_for(tokens: int) -> Any:
        batch = random_batch(tokens, config.vocab_size, "cuda")
        return lambda: _our_step(model, adapter, batch, opt, args.loss_chunk_tokens, kernels)

    results = _run_lengths("streamtune", args.tokens, args.steps, step_for, place,
                           lambda tokens: {"transfer": engine.step_metrics(), "kernel_calls": dict(CALLS),
                                           "counted_steps": args.steps + WARMUP_STEPS},
                           gc_every_steps=args.gc_every_steps)
    for result in results:
        _attach_transfer(result, args.steps + WARMUP_STEPS)
    if args.skip_resident:
        return results
    # Resident: decode every layer onto the uncapped GPU (the host buffers are the only copy).
    cap_gpu_memory(None)
    engine.set_streamed([])
    results += _run_lengths("resident", args.tokens, args.steps, step_for, gc_every_steps=args.gc_every_steps)
    return results


def _fast_kernels(model: Any, mode: str) -> tuple[Any, dict]:
    """``--kernels``: the fast pieces for this GPU, applied to ``model``."""
    from streamtune.kernels import apply_kernels, select_for_device

    kernels = select_for_device(mode, torch.device("cuda"), torch.bfloat16)
    return kernels, apply_kernels(model, kernels)


def _attach_transfer(result: StepResult, num_steps: int) -> None:
    """Per-step transfer fields from the metrics of the warm-up + timed steps."""
    metrics = result.extra.pop("transfer", None)
    if metrics:
        result.h2d_bytes = metrics["h2d_bytes"] / num_steps
        result.h2d_gbps = metrics["h2d_gbps"]
        result.copy_wait_s = metrics["copy_wait_s"] / num_steps


def run_accelerate(args: Any) -> list[StepResult]:
    """The stock recipe: accelerate device_map CPU offload, LoRA on GPU-resident layers only."""
    from accelerate import dispatch_model, infer_auto_device_map

    config = bench_config(args.model, args.num_layers)
    model = build_random_model(config)
    layer_cls = type(model.model.layers[0])
    weights_budget = max(1, int(args.gpu_budget_gib - args.accelerate_headroom_gib))
    device_map = infer_auto_device_map(model, max_memory={0: f"{weights_budget}GiB", "cpu": "1000GiB"},
                                       no_split_module_classes=[layer_cls.__name__], dtype=torch.bfloat16)
    on_gpu = sorted(int(k.split(".")[2]) for k, v in device_map.items()
                    if k.startswith("model.layers.") and v == 0 and k.count(".") == 2)
    print(f"[bench] accelerate keeps layers {on_gpu} on the GPU", flush=True)
    model = dispatch_model(model, device_map=device_map, main_device=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = attach_lora(model, args.lora_rank, layers=on_gpu or [0])
    return _run_hf_baseline("accelerate", model, config, args, {"lora_layers": len(on_gpu)})


def run_stock(args: Any) -> list[StepResult]:
    """The stock step on a GPU that holds the whole model: transformers + stock PEFT LoRA (fp32 adapters) +
    HF non-reentrant gradient checkpointing + HF's own loss, bf16 weights resident on the uncapped GPU."""
    config = bench_config(args.model, args.num_layers)
    model = build_random_model(config).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = attach_lora(model, args.lora_rank)
    return _run_hf_baseline("stock", model, config, args, {}, capped=False)


def _run_hf_baseline(name: str, model: Any, config: Any, args: Any, extra: dict,
                     capped: bool = True) -> list[StepResult]:
    """Time a baseline that uses the model's own (unchunked) loss, under the GPU cap unless not ``capped``
    (then with ``--steps``, as streamtune: it is as fast)."""
    cap_gpu_memory(int(args.gpu_budget_gib * GIB) if capped else None)
    opt = _adamw(model)

    def step_for(tokens: int) -> Any:
        batch = random_batch(tokens, config.vocab_size, "cuda")
        return lambda: _hf_step(model, batch, opt)

    results = _run_lengths(name, args.tokens, args.baseline_steps if capped else args.steps, step_for)
    for result in results:
        result.extra.update(extra)
    return results


def run_fsdp2(args: Any) -> list[StepResult]:
    """FSDP2 with pinned CPU offload on one GPU (world size 1)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    config = bench_config(args.model, args.num_layers)
    model = attach_lora(build_random_model(config), args.lora_rank)
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    policy = CPUOffloadPolicy(pin_memory=True)
    # bf16 all-gathers for the bf16 base and the fp32 LoRA weights alike; fp32 gradient reduction
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    start = time.perf_counter()
    for layer in base.model.layers:
        fully_shard(layer, offload_policy=policy, mp_policy=precision)
    fully_shard(model, offload_policy=policy, mp_policy=precision)
    shard_s = time.perf_counter() - start
    print(f"[bench] fsdp2 sharded (pinned) in {shard_s:.1f} s", flush=True)
    results = _run_hf_baseline("fsdp2", model, config, args, {"shard_s": shard_s})
    dist.destroy_process_group()
    return results


VARIANTS = {"streamtune": run_streamtune, "stock": run_stock, "accelerate": run_accelerate, "fsdp2": run_fsdp2}
