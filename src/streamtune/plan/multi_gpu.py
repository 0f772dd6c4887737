"""Two unequal GPUs on one host: data parallel with per-rank plans against a layer split.

Data parallel: each GPU gets its own plan (its budget, its link, its streamed layers) and computes
whole micro-batches; the step's ``micro_batches`` are split between the GPUs so both finish together
(the faster one takes more); then one flattened all-reduce of the LoRA gradients (fp32) crosses PCIe.
Both GPUs stream every layer they cannot keep resident, each over its own link.

Layer split (``train.devices``, :mod:`streamtune.offload.split`): GPU 0 computes layers ``[0, k)``,
GPU 1 layers ``[k, L)``, each keeping as many of its own layers resident as its memory allows and
streaming the rest; embeddings, LM head and loss stay on GPU 0. Every micro-batch's activations
(``tokens x hidden`` bf16) cross to GPU 1 and back, forward and backward. Without pipelining the GPUs
work one after the other, so a micro-batch takes the sum of both halves; what it saves is streaming:
the two memories together hold more of the model. Both GPUs are charged the embeddings, LM head and
loss buffers (conservative for GPU 1). :func:`plan_split` is the plan ``streamtune train`` places by.

The step-time model is :mod:`streamtune.plan.timing`'s, per GPU with its own profile.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from streamtune.errors import InputError
from streamtune.plan import timing
from streamtune.plan.memory import host_peak_bytes
from streamtune.plan.planner import Plan, _meta, _Settings, _targets, gib, make_plan, place_layers
from streamtune.plan.profiles import LinkProfile
from streamtune.plan.sizing import ModelSize, size_model

GB = 1e9
# Without NVLink or P2P, GPU-to-GPU bytes go device -> host -> device: half the slower H2D speed.
PCIE_HOP_FRACTION = 0.5
GRAD_BYTES_PER_PARAM = 4


@dataclass
class MultiGpuPlan:
    """The two candidates for a pair of GPUs, and the pick.

    Attributes:
        gpus: the profiles, rank order.
        budgets_bytes: GPU budget per rank.
        tokens: tokens per micro-batch.
        micro_batches: micro-batches per optimizer step (over both GPUs).
        data_parallel: per-rank plans, split, step seconds (None when a rank does not fit).
        layer_split: split layer, per-GPU streamed layers, step seconds (None when no split fits).
        choice: ``data_parallel``, ``layer_split`` or ``none``.
        reason: one sentence why.
        host_bytes: host memory of the data-parallel run (one shared copy for both ranks).
    """

    gpus: list[LinkProfile]
    budgets_bytes: list[int]
    tokens: int
    micro_batches: int
    data_parallel: dict[str, Any] | None
    layer_split: dict[str, Any] | None
    choice: str
    reason: str
    host_bytes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": [g.gpu_name for g in self.gpus], "budgets_bytes": self.budgets_bytes, "tokens": self.tokens,
                "micro_batches": self.micro_batches, "data_parallel": self.data_parallel,
                "layer_split": self.layer_split, "choice": self.choice, "reason": self.reason,
                "host_bytes": self.host_bytes}


def _micro_seconds(plan: Plan) -> tuple[float, float]:
    optimizer = float(plan.timing["compute_optimizer_seconds"])
    return plan.step_seconds - optimizer, optimizer


def hop_seconds(num_bytes: float, gpus: list[LinkProfile]) -> float:
    """Time to move ``num_bytes`` from one GPU to another over PCIe through host memory."""
    return num_bytes / (min(g.h2d_gbps for g in gpus) * PCIE_HOP_FRACTION * GB)


def local_sum_seconds(num_bytes: float, gpus: list[LinkProfile]) -> float:
    """Time of the shared-memory sum of ``num_bytes`` (``train.dist_backend: gloo``): each rank copies its part to
    the host and every part back, one D2H and ``len(gpus)`` H2D copies on its own link.

    The same count for two ranks sharing one H200's link (2 D2H + 4 H2D of 74 MB at 55 GB/s: 8.1 ms) is within
    the 9.9 ms measured (``benchmarks/allreduce.py``, session 16); the rest is the barriers.
    """
    return (1 + len(gpus)) * num_bytes / (min(g.h2d_gbps for g in gpus) * GB)


def data_parallel(plans: list[Plan], micro_batches: int, gpus: list[LinkProfile],
                  dist_backend: str = "auto") -> dict[str, Any] | None:
    """Best split of the step's micro-batches over the ranks' plans (None when a rank does not fit); the gradient
    sum goes over the host as one hop (NCCL) or as the shared-memory sum (``dist_backend`` gloo)."""
    if not all(p.fits_gpu for p in plans):
        return None
    per_micro = [_micro_seconds(p) for p in plans]
    grads = plans[0].lora_trainable_params * GRAD_BYTES_PER_PARAM
    reduce_s = local_sum_seconds(grads, gpus) if dist_backend == "gloo" else hop_seconds(grads, gpus)

    def step(split: list[int]) -> float:
        return max(m * micro + opt for m, (micro, opt) in zip(split, per_micro) if m > 0) + reduce_s

    best = min(([m, micro_batches - m] for m in range(1, micro_batches)), key=step)
    even = [micro_batches // 2, micro_batches - micro_batches // 2]
    return {
        "ranks": [{"gpu": g.gpu_name, "streamed_layers": len(p.streamed_indices), "resident_layers": len(p.resident_indices),
                   "micro_batch_seconds": m, "limited_by": p.limited_by, "gpu_peak_bytes": p.gpu_peak_bytes}
                  for g, p, (m, _) in zip(gpus, plans, per_micro)],
        "split": best, "step_seconds": step(best), "even_split": even, "even_step_seconds": step(even),
        "allreduce_seconds": reduce_s, "allreduce_bytes": grads,
        "allreduce_path": "shared memory (gloo)" if dist_backend == "gloo" else "NCCL",
    }


def _sub_model(model: ModelSize, start: int, stop: int) -> ModelSize:
    layers = [dataclasses.replace(layer, index=i) for i, layer in enumerate(model.layers[start:stop])]
    types = model.layer_types[start:stop] if model.layer_types else []
    return dataclasses.replace(model, layers=layers, layer_types=types)


def _head_seconds(model: ModelSize, tokens: int, link: LinkProfile) -> float:
    return timing.layer_pass_seconds(2.0 * model.hidden * model.vocab * tokens, model.hidden * model.vocab * 2, link)


def _half(model: ModelSize, s: _Settings, budget: int, link: LinkProfile, has_head: bool,
          start: int = 0) -> dict[str, Any] | None:
    streamed_idx, slots, gpu = place_layers(model, s, budget)
    if sum(gpu.values()) > budget:
        return None
    chosen = set(streamed_idx)
    compute = timing.compute_seconds(model, s.tokens, s.lora_rank, s.codec, s.checkpointing, link, s.kernels)
    if not has_head:
        head = _head_seconds(model, s.tokens, link)
        compute = {**compute, "forward": compute["forward"] - head, "backward": compute["backward"] - head}
    transfer = timing.transfer_seconds([x for x in model.layers if x.index in chosen], slots, link)
    sides = timing.side_seconds(compute, transfer)
    return {"gpu": link.gpu_name, "layers": model.num_layers, "first_layer": start,
            "streamed_indices": [start + i for i in streamed_idx], "streamed_layers": len(streamed_idx),
            "gpu_peak_bytes": sum(gpu.values()), "pass_seconds": timing.pass_seconds(compute, transfer),
            "optimizer_seconds": compute["optimizer"], "limited_by": max(sides, key=sides.get)}


def split_plan(model: ModelSize, s: _Settings, budgets: list[int], gpus: list[LinkProfile], boundaries: list[int],
               micro_batches: int) -> dict[str, Any] | None:
    """The layer split at ``boundaries`` (first layer of each GPU after the first); None when a range does not fit."""
    edges = [0, *boundaries, model.num_layers]
    halves = [_half(_sub_model(model, a, b), s, budget, link, has_head=index == 0, start=a)
              for index, (a, b, budget, link) in enumerate(zip(edges, edges[1:], budgets, gpus))]
    if any(h is None for h in halves):
        return None
    crossing_bytes = s.tokens * model.hidden * 2
    crossing_s = hop_seconds(crossing_bytes, gpus)
    crossings = 2 * len(gpus)  # to each next GPU and back to the head, forward and backward
    micro = sum(sum(h["pass_seconds"].values()) for h in halves) + crossings * crossing_s
    step = micro_batches * micro + max(h["optimizer_seconds"] for h in halves)
    return {"split_layer": boundaries[0], "boundaries": list(boundaries), "gpus": halves, "micro_batch_seconds": micro,
            "step_seconds": step, "crossing_bytes": crossing_bytes, "crossings_per_micro_batch": crossings,
            "crossing_seconds": crossing_s, "micro_batches": micro_batches}


def layer_split(model: ModelSize, s: _Settings, budgets: list[int], gpus: list[LinkProfile],
                micro_batches: int) -> dict[str, Any] | None:
    """The fastest split point of two GPUs where both halves fit (None when none does)."""
    best = None
    for k in range(1, model.num_layers):
        candidate = split_plan(model, s, budgets, gpus, [k], micro_batches)
        if candidate is not None and (best is None or candidate["step_seconds"] < best["step_seconds"]):
            best = candidate
    return best


def _sized(model: Any, kwargs: dict[str, Any]) -> tuple[ModelSize, _Settings]:
    p = make_plan(model, suggest=False, **kwargs)
    name, config, meta = _meta(model, kwargs.get("trust_remote_code", False))
    sized = size_model(config, p.codec, p.lora_rank, _targets(config, kwargs.get("lora_targets", "auto")),
                       list(kwargs.get("lora_target_parameters", ())), model=meta, name=name)
    settings = _Settings(p.codec, p.tokens, p.lora_rank, p.gradient_checkpointing, kwargs.get("stream", "auto"),
                         kwargs.get("ring_slots", 2), p.loss_chunk_tokens, kwargs.get("kernels", "auto"))
    return sized, settings


def plan_split(model: Any, gpus: list[LinkProfile], budgets_bytes: list[int], boundaries: list[int] | None,
               micro_batches: int, **kwargs: Any) -> dict[str, Any]:
    """The layer split ``streamtune train`` runs with ``train.devices`` (see the module docstring).

    Args:
        model: as :func:`~streamtune.plan.make_plan`.
        gpus: one profile per device, in ``train.devices`` order.
        budgets_bytes: GPU budget per device.
        boundaries: first decoder layer of each device after the first (``memory.layer_split``); None (auto):
            the fastest split of two GPUs that fits.
        micro_batches: micro-batches per optimizer step (``train.grad_accum``).
        **kwargs: codec, tokens, lora_rank, lora_targets, lora_target_parameters, gradient_checkpointing,
            stream, ring_slots, loss_chunk_tokens, trust_remote_code (as :func:`make_plan`).

    Raises:
        InputError: auto with other than two GPUs, boundaries that do not fit the model, or no split that fits
            every budget (the message says what to lower).
    """
    sized, settings = _sized(model, dict(kwargs, link=gpus[0], gpu_budget_bytes=budgets_bytes[0]))
    if boundaries is None:
        if len(gpus) != 2:
            raise InputError(f"memory.layer_split: auto picks the split of two devices; give the first layer of each "
                             f"device after the first for {len(gpus)} devices, e.g. memory.layer_split=10,20")
        found = layer_split(sized, settings, budgets_bytes, gpus, micro_batches)
    else:
        if boundaries[-1] >= sized.num_layers:
            raise InputError(f"memory.layer_split: {','.join(map(str, boundaries))} must be below the model's "
                             f"{sized.num_layers} decoder layers")
        found = split_plan(sized, settings, budgets_bytes, gpus, boundaries, micro_batches)
    if found is None:
        where = "any split point" if boundaries is None else f"memory.layer_split={','.join(map(str, boundaries))}"
        raise InputError(f"train.devices: the layer split does not fit the GPU budgets ({', '.join(gib(b) for b in budgets_bytes)}) "
                         f"at {where}: lower data.seq_len or train.batch_size, use memory.codec=int8 or nf4, raise "
                         f"memory.gpu_budgets, or try memory.layer_split=auto")
    return found


def _choose(dp: dict[str, Any] | None, ls: dict[str, Any] | None) -> tuple[str, str]:
    if dp is None and ls is None:
        return "none", "neither fits: lower --tokens or use a stronger codec (--codec int8/nf4)"
    if ls is None:
        return "data_parallel", "no layer split fits both GPUs"
    if dp is None:
        return "layer_split", "a rank cannot hold a data-parallel plan (its GPU is too small for the micro-batch)"
    streamed_dp = sum(r["streamed_layers"] for r in dp["ranks"])
    streamed_ls = sum(g["streamed_layers"] for g in ls["gpus"])
    if dp["step_seconds"] <= ls["step_seconds"]:
        return "data_parallel", (
            f"both GPUs compute at once ({dp['split'][0]}:{dp['split'][1]} micro-batches); the layer split would run "
            f"them one after the other, which its {streamed_ls} streamed layer(s) against data parallel's "
            f"{streamed_dp} (both ranks together) do not make up for")
    return "layer_split", (
        f"the two memories together keep more of the model resident ({streamed_ls} streamed layer(s) against "
        f"{streamed_dp} streamed by the data-parallel ranks together, each micro-batch), which outweighs running the "
        f"GPUs one after the other")


def plan_gpus(model: Any, gpus: list[LinkProfile], budgets_bytes: list[int] | None = None, micro_batches: int = 8,
              host_budget_bytes: int | None = None, **kwargs: Any) -> MultiGpuPlan:
    """Compare data parallel and a layer split for two GPUs of one host (see the module docstring).

    Args:
        model: as :func:`~streamtune.plan.make_plan`.
        gpus: two profiles, rank order.
        budgets_bytes: GPU budget per rank (default: each card's memory).
        micro_batches: micro-batches of ``tokens`` per optimizer step, over both GPUs
            (``train.grad_accum x 2``).
        host_budget_bytes: host RAM for the whole host.
        **kwargs: codec, tokens, lora_rank, lora_targets, lora_target_parameters, gradient_checkpointing,
            ring_slots, loss_chunk_tokens, trust_remote_code, kernels, dist_backend (as :func:`make_plan`).

    Raises:
        InputError: not two GPUs, budgets of the wrong length, ``micro_batches`` odd or < 2, or as :func:`make_plan`.
    """
    if len(gpus) != 2:
        raise InputError(f"--gpu: the multi-GPU planner compares two GPUs; got {len(gpus)}")
    budgets = list(budgets_bytes) if budgets_bytes is not None else [g.gpu_memory_bytes for g in gpus]
    if len(budgets) != len(gpus):
        raise InputError(f"--gpu-memory: give one budget per GPU ({len(gpus)}), comma-separated, e.g. 24GiB,16GiB")
    if micro_batches < 2 or micro_batches % 2:
        raise InputError(f"--micro-batches: {micro_batches} must be even and >= 2 (train.grad_accum x 2 ranks)")
    plans = [make_plan(model, link=g, gpu_budget_bytes=b, host_budget_bytes=host_budget_bytes, suggest=False,
                       local_ranks=2, **kwargs) for g, b in zip(gpus, budgets)]
    dp = data_parallel(plans, micro_batches, gpus, kwargs.get("dist_backend", "auto"))
    sized, settings = _sized(model, dict(kwargs, link=gpus[0], gpu_budget_bytes=budgets[0]))
    ls = layer_split(sized, settings, budgets, gpus, micro_batches)
    choice, reason = _choose(dp, ls)
    return MultiGpuPlan(gpus, budgets, plans[0].tokens, micro_batches, dp, ls, choice, reason, dict(plans[0].host_bytes))


def _size_text(num_bytes: int) -> str:
    """A size as a config value (``24GiB``)."""
    return f"{num_bytes / 2**30:g}GiB" if num_bytes % 2**20 == 0 else f"{num_bytes}B"


def run_lines(ls: dict[str, Any], budgets_bytes: list[int]) -> list[str]:
    """The config lines that train this layer split (one process, ``streamtune train CONFIG``)."""
    devices = ", ".join(f"cuda:{i}" for i in range(len(budgets_bytes)))
    return [f"train.devices: [{devices}]", f"train.grad_accum: {ls['micro_batches']}",
            f"memory.layer_split: {','.join(map(str, ls['boundaries']))}",
            f"memory.gpu_budgets: [{', '.join(_size_text(b) for b in budgets_bytes)}]"]


def format_multi(plan: MultiGpuPlan) -> str:
    """Plain-text comparison (``streamtune plan --gpu A,B``)."""
    names = " + ".join(f"{g.gpu_name} ({gib(b)}, {g.h2d_gbps:.0f} GB/s H2D)" for g, b in zip(plan.gpus, plan.budgets_bytes))
    lines = [f"GPUs: {names}; {plan.micro_batches} micro-batch(es) of {plan.tokens} tokens per step",
             f"host: {gib(host_peak_bytes(plan.host_bytes))} peak for both ranks (one shared copy of the weights: "
             f"{gib(plan.host_bytes['pinned_weights'])})", ""]
    dp = plan.data_parallel
    if dp is None:
        lines.append("data parallel: does not fit (a rank's plan exceeds its GPU budget)")
    else:
        lines.append(f"data parallel: {dp['step_seconds']:.2f} s/step, split {dp['split'][0]}:{dp['split'][1]} "
                     f"(even {dp['even_split'][0]}:{dp['even_split'][1]}: {dp['even_step_seconds']:.2f} s), "
                     f"all-reduce {dp['allreduce_bytes'] / 1e6:.0f} MB in {dp['allreduce_seconds'] * 1e3:.0f} ms "
                     f"({dp['allreduce_path']}); "
                     f"train it with STREAMTUNE_RANK_MICRO_BATCHES={dp['split'][0]},{dp['split'][1]} and "
                     f"train.grad_accum={plan.micro_batches // 2}")
        for rank, r in enumerate(dp["ranks"]):
            lines.append(f"  rank {rank} {r['gpu']}: {r['streamed_layers']} streamed / {r['resident_layers']} resident, "
                         f"{r['micro_batch_seconds']:.2f} s per micro-batch ({r['limited_by']}-bound), "
                         f"GPU peak {gib(r['gpu_peak_bytes'])}")
    ls = plan.layer_split
    if ls is None:
        lines.append("layer split: no split point fits both GPUs")
    else:
        lines.append(f"layer split: {ls['step_seconds']:.2f} s/step, layers 0-{ls['split_layer'] - 1} | "
                     f"{ls['split_layer']}-{ls['split_layer'] + ls['gpus'][1]['layers'] - 1}, "
                     f"{ls['crossings_per_micro_batch']} crossings of {ls['crossing_bytes'] / 1e6:.0f} MB per micro-batch; "
                     f"one process, the GPUs one after the other")
        for index, g in enumerate(ls["gpus"]):
            lines.append(f"  GPU {index} {g['gpu']}: {g['layers']} layer(s), {g['streamed_layers']} streamed, "
                         f"{sum(g['pass_seconds'].values()):.2f} s per micro-batch ({g['limited_by']}-bound), "
                         f"GPU peak {gib(g['gpu_peak_bytes'])}")
    lines += ["", f"picks: {plan.choice.replace('_', ' ')}: {plan.reason}"]
    if ls is not None:
        lines.append("run the layer split with `streamtune train CONFIG` (no torchrun) and these config lines:")
        lines += [f"  {line}" for line in run_lines(ls, plan.budgets_bytes)]
    if dp is not None:
        lines.append(f"run data parallel with `STREAMTUNE_RANK_MICRO_BATCHES={dp['split'][0]},{dp['split'][1]} "
                     f"torchrun --nproc-per-node 2 -m streamtune train CONFIG` and train.grad_accum: {plan.micro_batches // 2}")
    return "\n".join(lines)
