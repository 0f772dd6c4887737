"""The plan: which decoder layers stay resident and which stream, predicted memory and step time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamtune.errors import InputError
from streamtune.plan import memory, timing
from streamtune.plan.profiles import LinkProfile, resolve_link_profile
from streamtune.plan.sizing import ModelSize, size_model

CODECS = ("bf16", "int8", "nf4")
STREAM_MODES = ("auto", "all", "none")
GIB = 2**30
_META_CACHE: dict[str, tuple[Any, Any]] = {}


def gib(num_bytes: float) -> str:
    """``num_bytes`` as ``12.34 GiB``."""
    return f"{num_bytes / GIB:.2f} GiB"


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer: ``placement`` is ``resident`` or ``streamed``; ``bytes`` in ``codec``."""

    index: int
    placement: str
    codec: str
    bytes: int
    bf16_bytes: int
    num_params: int


@dataclass
class Plan:
    """Placement and predictions of one configuration (see :func:`make_plan`).

    Attributes:
        layers: one :class:`LayerPlan` per decoder layer.
        ring_slots: GPU ring slots the engine allocates (0 when nothing streams).
        gpu_bytes: GPU memory components (their sum is the peak).
        host_bytes: host memory components.
        timing: ``step_seconds``, ``tokens_per_second``, ``limited_by``, compute/transfer seconds, per pass.
        suggestions: when it does not fit, each knob that would fix it, with the resulting peak.
        active_params: base parameters one token multiplies with (experts by top_k / num_experts, plus the
            LM head): the N of MFU = 6 N tokens / step time / matmul peak.
    """

    model_name: str
    codec: str
    tokens: int
    lora_rank: int
    lora_trainable_params: int
    gradient_checkpointing: bool
    stream: str
    ring_slots: int
    loss_chunk_tokens: int
    layers: list[LayerPlan]
    groups: list[dict[str, Any]]
    gpu_bytes: dict[str, int]
    host_bytes: dict[str, int]
    gpu_budget_bytes: int
    host_budget_bytes: int | None
    timing: dict[str, Any]
    link: LinkProfile
    total_params: int
    suggestions: list[str] = field(default_factory=list)
    active_params: float = 0.0

    @property
    def streamed_indices(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.placement == "streamed"]

    @property
    def resident_indices(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.placement == "resident"]

    @property
    def gpu_peak_bytes(self) -> int:
        return sum(self.gpu_bytes.values())

    @property
    def tensor_peak_bytes(self) -> int:
        """Peak of live tensors (what ``torch.cuda.max_memory_allocated`` measures): the GPU peak without
        the allocator's slack and the CUDA context."""
        return self.gpu_peak_bytes - self.gpu_bytes.get("allocator_slack", 0) - self.gpu_bytes.get("cuda_context", 0)

    @property
    def host_peak_bytes(self) -> int:
        return memory.host_peak_bytes(self.host_bytes)

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_peak_bytes <= self.gpu_budget_bytes

    @property
    def fits_host(self) -> bool:
        return self.host_budget_bytes is None or self.host_peak_bytes <= self.host_budget_bytes

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    @property
    def step_seconds(self) -> float:
        return float(self.timing["step_seconds"])

    @property
    def tokens_per_second(self) -> float:
        return float(self.timing["tokens_per_second"])

    @property
    def limited_by(self) -> str:
        return str(self.timing["limited_by"])

    def check(self) -> None:
        """Refuse a run that would not fit, before any weight loads.

        Raises:
            InputError: GPU or host memory exceeds its budget; the message has the plan table, the
                shortfall and each knob that fixes it.
        """
        if self.fits:
            return
        from streamtune.plan.report import format_table

        raise InputError(f"{self.shortfall_text()}\n\n{format_table(self, shortfall=False)}")

    def shortfall_text(self) -> str:
        """One paragraph: what exceeds its budget by how much, and the knobs that fix it."""
        lines = []
        if not self.fits_gpu:
            over = self.gpu_peak_bytes - self.gpu_budget_bytes
            lines.append(f"does not fit: GPU peak {gib(self.gpu_peak_bytes)} exceeds the GPU budget "
                         f"{gib(self.gpu_budget_bytes)} by {gib(over)}")
        if not self.fits_host:
            over = self.host_peak_bytes - self.host_budget_bytes
            lines.append(f"does not fit: host peak {gib(self.host_peak_bytes)} exceeds the host budget "
                         f"{gib(self.host_budget_bytes)} by {gib(over)}")
        if self.suggestions:
            lines.append("knobs that fix it:")
            lines.extend(f"  - {s}" for s in self.suggestions)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``streamtune plan --json``)."""
        return {
            "model": self.model_name, "codec": self.codec, "tokens": self.tokens, "lora_rank": self.lora_rank,
            "lora_trainable_params": self.lora_trainable_params, "total_params": self.total_params,
            "gradient_checkpointing": self.gradient_checkpointing, "stream": self.stream,
            "ring_slots": self.ring_slots, "fits": self.fits, "fits_gpu": self.fits_gpu, "fits_host": self.fits_host,
            "gpu_budget_bytes": self.gpu_budget_bytes, "host_budget_bytes": self.host_budget_bytes,
            "gpu_peak_bytes": self.gpu_peak_bytes, "host_peak_bytes": self.host_peak_bytes,
            "gpu_bytes": dict(self.gpu_bytes), "host_bytes": dict(self.host_bytes),
            "step_seconds": self.step_seconds, "tokens_per_second": self.tokens_per_second,
            "limited_by": self.limited_by, "timing": dict(self.timing),
            "link": {"gpu_name": self.link.gpu_name, "source": self.link.source, "h2d_gbps": self.link.h2d_gbps,
                     "matmul_tflops": self.link.matmul_tflops, "hbm_gbps": self.link.hbm_gbps},
            "streamed_indices": self.streamed_indices, "resident_indices": self.resident_indices,
            "layers": [{"index": x.index, "placement": x.placement, "codec": x.codec, "bytes": x.bytes,
                        "bf16_bytes": x.bf16_bytes, "params": x.num_params} for x in self.layers],
            "groups": self.groups, "suggestions": list(self.suggestions),
        }


def even_indices(num_layers: int, count: int) -> list[int]:
    """``count`` layer indices spread evenly over ``num_layers``: the j-th lies in ``[j*n/count, (j+1)*n/count)``,
    as near its middle as an integer can be."""
    if count <= 0:
        return []
    out = []
    for j in range(count):
        low = -(-j * num_layers // count)
        high = ((j + 1) * num_layers - 1) // count
        out.append(min(max((2 * j + 1) * num_layers // (2 * count), low), high))
    return out


def _check_inputs(codec: str, tokens: int, lora_rank: int, stream: str, ring_slots: int, loss_chunk_tokens: int) -> None:
    if codec not in CODECS:
        raise InputError(f"codec: {codec!r} is not allowed; allowed: {', '.join(CODECS)}")
    if stream not in STREAM_MODES:
        raise InputError(f"stream: {stream!r} is not allowed; allowed: {', '.join(STREAM_MODES)}")
    for key, value in (("tokens", tokens), ("lora_rank", lora_rank), ("ring_slots", ring_slots),
                       ("loss_chunk_tokens", loss_chunk_tokens)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{key}: {value!r} must be an integer >= 1")


def _meta(model: Any, trust_remote_code: bool) -> tuple[str, Any, Any]:
    from streamtune.models.build import adapter_for_or_input_error, resolve_config
    from streamtune.plan.sizing import build_meta_model

    if not isinstance(model, str):
        adapter_for_or_input_error(model)
        return getattr(model, "name_or_path", "") or getattr(model, "model_type", "model"), model, None
    if model not in _META_CACHE:
        config = resolve_config(model, trust_remote_code)
        _META_CACHE.clear()
        _META_CACHE[model] = (config, build_meta_model(config))
    config, meta = _META_CACHE[model]
    return model, config, meta


def _targets(config: Any, lora_targets: str | list[str] | None) -> str | list[str]:
    from streamtune.models.build import adapter_for_or_input_error

    if lora_targets is None or lora_targets == "auto":
        return adapter_for_or_input_error(config).default_lora_targets
    return lora_targets if isinstance(lora_targets, str) else list(lora_targets)


@dataclass(frozen=True)
class _Settings:
    codec: str
    tokens: int
    lora_rank: int
    checkpointing: bool
    stream: str
    ring_slots: int
    loss_chunk_tokens: int
    kernels: str = "auto"
    dist_backend: str = "auto"


def _groups(model: ModelSize, streamed: set[int]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for layer in model.layers:
        where = "streamed" if layer.index in streamed else "resident"
        for t in layer.tensors:
            row = rows.setdefault(t.group, {"group": t.group, "params": 0, "bf16_bytes": 0, "bytes": 0,
                                            "resident_layers": set(), "streamed_layers": set()})
            row["params"] += t.numel
            row["bf16_bytes"] += t.plain_bytes
            row["bytes"] += t.encoded_bytes
            row[f"{where}_layers"].add(layer.index)
    out = []
    for row in rows.values():
        row["placement"] = ("streamed" if not row["resident_layers"] else
                            "resident" if not row["streamed_layers"] else "mixed")
        row["resident_layers"] = len(row.pop("resident_layers"))
        row["streamed_layers"] = len(row.pop("streamed_layers"))
        out.append(row)
    for t in model.other:
        out.append({"group": t.group, "params": t.numel, "bf16_bytes": t.plain_bytes, "bytes": t.plain_bytes,
                    "placement": "resident (bf16)", "resident_layers": 0, "streamed_layers": 0, "name": t.name})
    return out


def _evaluate(model: ModelSize, s: _Settings, num_streamed: int) -> tuple[list[int], int, dict[str, int]]:
    streamed_idx = even_indices(model.num_layers, num_streamed)
    chosen = set(streamed_idx)
    streamed = [layer for layer in model.layers if layer.index in chosen]
    resident = [layer for layer in model.layers if layer.index not in chosen]
    slots = min(s.ring_slots, len(streamed))
    gpu = memory.gpu_components_bytes(model, resident, streamed, slots, s.codec, s.tokens,
                                      s.loss_chunk_tokens, s.checkpointing, s.kernels)
    return streamed_idx, slots, gpu


def place_layers(model: ModelSize, s: _Settings, gpu_budget_bytes: int) -> tuple[list[int], int, dict[str, int]]:
    """Streamed layer indices, ring slots and GPU components: as few streamed layers as fit the budget."""
    if s.stream == "none":
        return _evaluate(model, s, 0)
    if s.stream == "all":
        return _evaluate(model, s, model.num_layers)
    for num_streamed in range(model.num_layers + 1):
        result = _evaluate(model, s, num_streamed)
        if sum(result[2].values()) <= gpu_budget_bytes:
            return result
    return result


def _build(name: str, model: ModelSize, s: _Settings, gpu_budget_bytes: int, host_budget_bytes: int | None,
           link: LinkProfile, local_ranks: int = 1) -> Plan:
    streamed_idx, slots, gpu = place_layers(model, s, gpu_budget_bytes)
    chosen = set(streamed_idx)
    streamed = [layer for layer in model.layers if layer.index in chosen]
    compute = timing.compute_seconds(model, s.tokens, s.lora_rank, s.codec, s.checkpointing, link, s.kernels)
    transfer = timing.transfer_seconds(streamed, slots, link)
    estimate = timing.step_estimate(compute, transfer, s.tokens)
    estimate.update({f"compute_{k}_seconds": v for k, v in compute.items()})
    estimate.update({f"transfer_{k}_seconds": v for k, v in transfer.items()})
    layers = [LayerPlan(x.index, "streamed" if x.index in chosen else "resident", s.codec, x.encoded_bytes,
                        x.plain_bytes, x.num_params) for x in model.layers]
    return Plan(
        model_name=name, codec=s.codec, tokens=s.tokens, lora_rank=s.lora_rank,
        lora_trainable_params=model.lora_params, gradient_checkpointing=s.checkpointing, stream=s.stream,
        ring_slots=slots, loss_chunk_tokens=s.loss_chunk_tokens, layers=layers, groups=_groups(model, chosen),
        gpu_bytes=gpu, host_bytes=memory.host_components_bytes(
            model, streamed, local_ranks, num_compile_workers=memory.num_compile_workers(s.kernels, local_ranks),
            dist_backend=s.dist_backend),
        gpu_budget_bytes=gpu_budget_bytes, host_budget_bytes=host_budget_bytes, timing=estimate, link=link,
        total_params=model.total_params,
        active_params=sum(x.active_params for x in model.layers) + model.hidden * model.vocab,
    )


def make_plan(
    model: Any, *, codec: str = "bf16", tokens: int = 2048, lora_rank: int = 16,
    lora_targets: str | list[str] | None = "auto", lora_target_parameters: list[str] | tuple[str, ...] = (),
    gradient_checkpointing: bool = True, gpu_budget_bytes: int | None = None, host_budget_bytes: int | None = None,
    stream: str = "auto", ring_slots: int = 2, loss_chunk_tokens: int = 1024, link: LinkProfile | None = None,
    gpu: str | None = None, trust_remote_code: bool = False, suggest: bool = True, local_ranks: int = 1,
    kernels: str = "auto", dist_backend: str = "auto",
) -> Plan:
    """Plan a LoRA run of ``model`` without loading weights (the model is sized on ``meta``).

    Args:
        model: a preset name, a local HF checkpoint directory (only config.json is read) or a HF config.
        codec: storage/transfer codec of frozen decoder-layer weights: bf16, int8 or nf4.
        tokens: tokens per micro-batch (batch_size x seq_len).
        lora_rank: LoRA rank r.
        lora_targets: "auto" (the architecture's default), a PEFT regex string, or module names.
        lora_target_parameters: fused parameters to adapt, e.g. ``["experts.gate_up_proj"]``.
        gradient_checkpointing: recompute each decoder layer in the backward.
        gpu_budget_bytes: GPU memory the run may use; default the card's memory from ``link``.
        host_budget_bytes: host RAM the run may use; None: not checked.
        stream: "auto" (fewest streamed layers that fit), "all" or "none".
        ring_slots: GPU ring slots for streamed layers.
        loss_chunk_tokens: tokens per chunk of the LM-head loss.
        link: speeds to plan with; default :func:`resolve_link_profile` of ``gpu``.
        gpu: a named GPU profile (``rtx4090``, ``h100``, ...) when ``link`` is None.
        trust_remote_code: passed to ``AutoConfig`` for checkpoint directories.
        suggest: when it does not fit, re-plan with each knob changed and list the ones that fit.
        local_ranks: processes on this host (torchrun ``--nproc-per-node``); they share one host copy
            of the weights, so the host line counts it once and the runtime once per rank.
        kernels: ``train.kernels``: ``auto`` (the fast path: fused loss, block masks, FlexAttention, compiled
            layers) or ``eager`` (the stock HF path); or a cost model of ``plan.timing.KERNEL_COSTS``
            (``fast``: the fast path without compiled layers); memory and step time follow it.
        dist_backend: ``train.dist_backend`` with ``local_ranks`` > 1: what each rank's process group adds to
            the host line (NCCL's communicator; gloo's share of the shared gradient-sum slots).

    Returns:
        The :class:`Plan`; call ``plan.check()`` to refuse a run that would not fit.

    Raises:
        InputError: bad model name/directory, unknown codec/stream/GPU, non-positive sizes.
    """
    _check_inputs(codec, tokens, lora_rank, stream, ring_slots, loss_chunk_tokens)
    link = link if link is not None else resolve_link_profile(gpu)
    budget = int(gpu_budget_bytes) if gpu_budget_bytes is not None else link.gpu_memory_bytes
    name, config, meta = _meta(model, trust_remote_code)
    targets = _targets(config, lora_targets)
    settings = _Settings(codec, tokens, lora_rank, gradient_checkpointing, stream, ring_slots, loss_chunk_tokens,
                         kernels, dist_backend)
    sized = size_model(config, codec, lora_rank, targets, list(lora_target_parameters), model=meta, name=name)
    plan = _build(name, sized, settings, budget, host_budget_bytes, link, local_ranks)
    if suggest and not plan.fits:
        plan.suggestions = _suggestions(plan, model, dict(
            codec=codec, tokens=tokens, lora_rank=lora_rank, lora_targets=lora_targets,
            lora_target_parameters=lora_target_parameters, gradient_checkpointing=gradient_checkpointing,
            gpu_budget_bytes=budget, host_budget_bytes=host_budget_bytes, stream=stream, ring_slots=ring_slots,
            loss_chunk_tokens=loss_chunk_tokens, link=link, trust_remote_code=trust_remote_code, suggest=False,
            local_ranks=local_ranks, kernels=kernels, dist_backend=dist_backend))
    return plan


def _variant(model: Any, kwargs: dict[str, Any], **changes: Any) -> Plan:
    return make_plan(model, **{**kwargs, **changes})


def _suggestions(plan: Plan, model: Any, kwargs: dict[str, Any]) -> list[str]:
    """Each single knob change that fixes what ``plan`` exceeds, with the peak it gives."""
    out = []
    if plan.stream == "none":
        alt = _variant(model, kwargs, stream="auto")
        if alt.fits_gpu:
            out.append(f"--stream auto (memory.stream): streams {len(alt.streamed_indices)} layer(s), "
                       f"GPU peak {gib(alt.gpu_peak_bytes)}")
    for codec in CODECS[CODECS.index(plan.codec) + 1:]:
        alt = _variant(model, kwargs, codec=codec)
        if (alt.fits_gpu and not plan.fits_gpu) or (alt.fits_host and not plan.fits_host):
            out.append(f"--codec {codec} (memory.codec): GPU peak {gib(alt.gpu_peak_bytes)}, "
                       f"host peak {gib(alt.host_peak_bytes)}")
            break
    if not plan.fits_gpu:
        out.extend(_halving(model, kwargs, "tokens", "--tokens", "data.seq_len x train.batch_size"))
        out.extend(_halving(model, kwargs, "loss_chunk_tokens", "--loss-chunk-tokens", "train.loss_chunk_tokens"))
        out.extend(_halving(model, kwargs, "lora_rank", "--lora-rank", "lora.rank"))
        if plan.ring_slots > 1:
            out.extend(_halving(model, kwargs, "ring_slots", "--ring-slots", "memory.ring_slots"))
        floor = _variant(model, kwargs, stream="all" if plan.stream == "auto" else plan.stream,
                         gpu_budget_bytes=1 << 62, host_budget_bytes=None)
        out.append(f"--gpu-memory {gib(floor.gpu_peak_bytes)} or more (memory.gpu_budget)")
    if not plan.fits_host:
        out.append(f"--host-memory {gib(plan.host_peak_bytes)} or more (memory.host_budget)")
    return out


def _halving(model: Any, kwargs: dict[str, Any], key: str, flag: str, config_key: str) -> list[str]:
    value = kwargs[key] // 2
    while value >= 1:
        alt = _variant(model, kwargs, **{key: value})
        if alt.fits_gpu:
            return [f"{flag} {value} ({config_key}): GPU peak {gib(alt.gpu_peak_bytes)}"]
        value //= 2
    return []


def plan_for_run(cfg: Any, link: LinkProfile | None = None, gpu_budget_bytes: int | None = None,
                 host_budget_bytes: int | None = None, local_ranks: int = 1) -> Plan:
    """The plan of a :class:`~streamtune.config.RunConfig` (what ``streamtune train`` checks and places by).

    ``memory.gpu_budget``/``memory.host_budget`` win over the given defaults (e.g. the card's free memory).

    Raises:
        InputError: as :func:`make_plan`.
    """
    from streamtune.config import parse_bytes

    mem = cfg.memory
    gpu_budget = parse_bytes(mem.gpu_budget) if mem.gpu_budget else gpu_budget_bytes
    host_budget = parse_bytes(mem.host_budget) if mem.host_budget else host_budget_bytes
    return make_plan(
        cfg.model.name, codec=mem.codec, tokens=cfg.train.batch_size * cfg.data.seq_len, lora_rank=cfg.lora.rank,
        lora_targets=cfg.lora.targets, lora_target_parameters=list(cfg.lora.target_parameters),
        gradient_checkpointing=mem.gradient_checkpointing, gpu_budget_bytes=gpu_budget,
        host_budget_bytes=host_budget, stream=mem.stream, ring_slots=mem.ring_slots,
        loss_chunk_tokens=cfg.train.loss_chunk_tokens, link=link, trust_remote_code=cfg.model.trust_remote_code,
        local_ranks=local_ranks, kernels=timing.cost_model(cfg.train.kernels, cfg.train.compile_layers),
        dist_backend=cfg.train.dist_backend,
    )
