"""Step-time model: compute (roofline per decoder layer and pass) against streamed bytes over the link.

FLOPs per token of a decoder layer's matmuls: 2 x its active parameters (attention, dense MLP, router,
top_k / num_experts of the experts). Per step, with LoRA the frozen base needs no weight gradient:

- forward: 2 x active x tokens;
- backward: recompute 2 (with gradient checkpointing) + input gradient 2, so 6 x active x tokens in all
  (4 without checkpointing). A LoRA-adapted fused expert parameter also gets a full weight gradient
  (+2 x its active share) and PEFT's fold ``W + B@A`` (2 x r x numel per fold, one per forward/recompute,
  two more in the backward). The fast kernels compute it as grouped low-rank products instead: no fold and
  no full weight gradient.
- attention scores: 4 x tokens x context x q width per forward (context = tokens / 2 causal, capped by the
  sliding window); the backward costs twice the forward.
- LoRA's own matmuls: 2 x LoRA params x tokens per pass (an upper bound for fused-parameter adapters).
- LM head: 2 x hidden x vocab per token forward, the same again for its input gradient.

A layer pass takes max(FLOPs / matmul speed, weight bytes read / HBM speed) on the GPU, plus the kernel
mode's elementwise time per token and fixed time per pass (:class:`KernelCosts`): at small token counts
the expert weights make MoE layers memory-bound, and expert GEMMs run at ``EXPERT_MATMUL_EFFICIENCY`` of
the matmul speed (eager) or at an efficiency that grows with the tokens routed per expert (fast). int8/nf4
add one dequantisation of every layer per pass (forward; recompute + backward share one), at
``DECODE_STEP_EFFICIENCY`` of the profile's decode speed. The host needs
``cpu_s_per_layer_pass`` to issue a layer pass (Python, dispatch, launches): with the fast kernels a short
step waits on the CPU, not on the GPU. Per pass, step time is
max(GPU compute, CPU issue, streamed bytes / H2D): streamed layers are spread between resident ones, so
copies overlap compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamtune.plan.profiles import LinkProfile
from streamtune.plan.sizing import LayerSize, ModelSize

TFLOP = 1e12
GB = 1e9
# Calibration (stock HF Gemma4-26B-A4B, fully resident on an H200: 0.6 s/step at 64 tokens, 0.9 s at 2048):
# fixed time of one decoder layer pass (kernel launches, routing, Python), and the share of the matmul
# speed grouped expert GEMMs reach. The device benchmark refines both.
LAYER_PASS_OVERHEAD_S = 0.0065
EXPERT_MATMUL_EFFICIENCY = 0.25
# Share of the matmul speed the attention score/value products reach: SDPA with explicit (sliding-window)
# masks and Gemma4's 512-wide global heads runs without a flash kernel. Fitted to the resident bf16 step of
# gemma4-26b-a4b on an H200 (0.68 / 0.80 / 2.51 s at 512 / 2048 / 8192 tokens, 2026-11-28).
ATTENTION_EFFICIENCY = 0.045


@dataclass(frozen=True)
class KernelCosts:
    """What a kernel mode (``train.kernels``) costs beyond the matmul roofline, per decoder layer pass.

    Attributes:
        attention_efficiency: share of the matmul speed the attention products reach.
        gpu_s_per_layer_pass: fixed GPU time of one layer pass (small kernels, routing).
        elementwise_s_per_token: GPU time per token of one layer pass's norms, activations, residuals and
            casts, at the calibration card's memory speed (scaled by ``hbm_gbps``).
        cpu_s_per_layer_pass: host time to issue one layer pass.
        expert_half_rows: tokens routed per expert at which grouped expert GEMMs reach half the matmul
            speed (efficiency ``rows / (rows + expert_half_rows)``); None: ``EXPERT_MATMUL_EFFICIENCY``.
        wide_attention_efficiency: ``attention_efficiency`` of heads wider than 256 at long sequences, where the
            fast path replaces FlexAttention by row-chunked GEMMs; None: the same as the others.
    """

    attention_efficiency: float
    gpu_s_per_layer_pass: float
    elementwise_s_per_token: float
    cpu_s_per_layer_pass: float
    expert_half_rows: float | None = None
    wide_attention_efficiency: float | None = None

    def layer_attention_efficiency(self, layer: LayerSize, tokens: int) -> float:
        """``attention_efficiency``, or for a head wider than 256 at a sequence long enough for the row-chunked
        GEMM attention (``streamtune.kernels.wide_attention``) ``wide_attention_efficiency`` where set."""
        from streamtune.kernels.select import wide_attention_applies

        if self.wide_attention_efficiency and wide_attention_applies(layer.shape.head_dim, tokens):
            return self.wide_attention_efficiency
        return self.attention_efficiency

    def expert_efficiency(self, rows_per_expert: float) -> float:
        """Share of the matmul speed the grouped expert GEMMs reach at ``rows_per_expert`` routed tokens."""
        if self.expert_half_rows is None:
            return EXPERT_MATMUL_EFFICIENCY
        if rows_per_expert <= 0:  # a dense layer: no expert GEMMs to slow down
            return 1.0
        return rows_per_expert / (rows_per_expert + self.expert_half_rows)


# eager: the 2026-11-28 fit above (fixed time on the GPU side, nothing separate for the CPU).
# fast: FlexAttention (options per head dim), fused loss, compute-dtype LoRA, fused norms and activations, the
# routed experts with their compiled combine, the Triton int8 decode. Fitted to benchmarks/profile_step.py on the
# 26B preset, int8, 24 GiB cap, streamed (2026-11-30, session 7:
# benchmarks/results/profile_step-NVIDIA_H200-auto-20261130-151555-x2gpu0.json and -stages-*.json), planned with
# the named h200 profile:
# - flex attention 39.8 / 331.5 ms at 2048 / 8192 tokens: efficiency 0.20 / 0.21;
# - grouped GEMMs 111 / 297 ms (predicted 103 / 313 with experts at rows / (rows + 128));
# - the other kernels (norms, activations, routing, residuals, device copies; the 40 ms decode apart) 110 / 354 ms
#   over 90 layer passes: 0.31 ms per pass plus 0.441 us per token and pass;
# - the host issued the 2048-token step in 0.674 s (0.682 s on another H200 host): 7.5 ms per layer pass.
# In sample: 0.675 / 1.084 s predicted, 0.674 / 1.051 s measured; out of sample, one GPU of the data-parallel
# benchmark (4 micro-batches of 2048): 2.70 s predicted, 2.65 s measured.
# compiled: the fast path with each decoder layer's forward compiled (``train.compile_layers``, on by default on
# CUDA sm80+). Fitted the same way to benchmarks/profile_step.py (session 8:
# benchmarks/results/profile_step-NVIDIA_H200-auto-compiled-20261130-170800.json): attention and GEMMs as above
# (39.9 / 336.1 and 115.7 / 318.7 ms); the other kernels 66.6 / 198.2 ms at 2048 / 8192 tokens (0.25 ms per
# pass plus 0.238 us per token and pass: Inductor fuses the norms, casts and residuals); the host 0.339 s for
# the 2048-token step in that run and 0.31-0.43 s per step in two `streamtune bench` runs on the same card
# (steps of a host-bound step vary by +-15 % there): 4.0 ms per layer pass. Refitted (session 12) after the batched
# decode to the three host-bound `streamtune bench` points on the H200 (26B, 2048 tokens, 24 GiB): int8 0.331 s
# (...-int8-20261201-001057.json, 10 timed steps 0.313-0.344 s) and 0.362 s (...-int8-20261130-201629.json), nf4
# all resident 0.367 s (...-nf4-20261130-203903.json): 3.75 ms per layer pass predicts +8 %, -1 %, -8 %.
# Refitted (session 13) to the two runs of the current build, both with the garbage collector out of the steps:
# 0.331 s (session 12) and 0.319 s (...-int8-20261201-015334-with-stock.json, 5 timed steps 0.318-0.324 s, where
# 3.75 ms predicted +13 %): 3.4 ms predicts 0.338 s with each run's measured link, +2 % / +6 %. The session-10
# points (int8 0.362 s, steps 0.318-0.416 s with collections inside them; nf4 0.367 s, now -13 %) predate the
# collector policy and are not re-measured.
# wide heads (session 9): the head_dim-512 layers at 4096 tokens and more run the row-chunked GEMM attention.
# benchmarks/flex_sweep.py on the H200 at 8192 tokens, one layer: FlexAttention 6.3 ms forward, 47.4 ms forward +
# backward; chunks of 64 Mi scores 10.3 / 31.0 ms, of 128 Mi 7.6 / 18.3 ms. A training step runs the forward twice
# (checkpoint recompute): 53.7 ms per layer with FlexAttention, 41.3 with 64 Mi, 25.9 with 128 Mi, so the
# efficiency is 0.21 x 53.7 / 25.9 = 0.435 with the default 128 Mi. Checked in sample with 64 Mi (efficiency
# 0.273): predicted 0.799 s for the 26B int8 step at 8192 tokens (0.838 s with FlexAttention's 0.21), measured
# 0.781 s by `streamtune bench` (benchmarks/results/stream_step-NVIDIA_H200-int8-20261130-183126.json). With
# 128 Mi it predicts 0.751 s; that step is not measured yet.
WIDE_ATTENTION_EFFICIENCY = 0.435
# Share of the link profile's decode speed (one 512 MB tensor, per-tensor decode, best of five) that a training
# step's batched per-layer decode reaches (``streamtune.offload.batch_decode``). int8, profiled (session 14,
# benchmarks/results/profile_step-NVIDIA_H200-auto-compiled-20261201-040101.json, 6-layer cut at 8192 tokens): 12
# layer decodes of 1.63 GB took 10.8 ms, 1.81 TB/s against the profile's 2.0 TB/s. nf4, fitted to the two nf4 points
# of ...-nf4-20261201-033201-with-stock.json (all 30 layers resident, decoded each pass): at that run's profile,
# 1.23 TB/s, the planner said -14 % / -10 % at 2048 / 8192 tokens, with 0.55 -4 % / -2 %. Profiled since (session
# 15, ...-nf4-compiled-20261201-052051.json, the same cut): 12 decodes in 27.9 ms, 0.70 TB/s, where the fit says
# 0.55 x 1.23 = 0.68 TB/s. The profile's nf4 speed varies between runs (1.03 TB/s in that one), so the factor is
# the fit's. tests/plan/test_bench_points.py keeps every current bench point within 10 %.
DECODE_STEP_EFFICIENCY = {"int8": 0.9, "nf4": 0.55}
KERNEL_COSTS = {
    "eager": KernelCosts(ATTENTION_EFFICIENCY, LAYER_PASS_OVERHEAD_S, 0.0, 0.0),
    "fast": KernelCosts(attention_efficiency=0.21, gpu_s_per_layer_pass=0.00031, elementwise_s_per_token=0.441e-6,
                        cpu_s_per_layer_pass=0.0075, expert_half_rows=128.0,
                        wide_attention_efficiency=WIDE_ATTENTION_EFFICIENCY),
    "compiled": KernelCosts(attention_efficiency=0.21, gpu_s_per_layer_pass=0.00025,
                            elementwise_s_per_token=0.238e-6, cpu_s_per_layer_pass=0.0034, expert_half_rows=128.0,
                            wide_attention_efficiency=WIDE_ATTENTION_EFFICIENCY),
}
# memory speed of the card the fast costs were fitted on (the named h200 profile): elementwise time scales by it
CALIBRATION_HBM_GBPS = 3600.0


def cost_model(kernels: str, compile_layers: bool | None = None) -> str:
    """The :data:`KERNEL_COSTS` key of a run's ``train.kernels`` and ``train.compile_layers``.

    ``auto`` compiles the layers unless ``compile_layers`` is false (its default on the GPUs plans are made for).
    """
    if kernels == "eager":
        return "eager"
    return "fast" if compile_layers is False else "compiled"


def kernel_costs(kernels: str) -> KernelCosts:
    """The costs of ``kernels``: a :data:`KERNEL_COSTS` key, or ``train.kernels`` (``auto``: compiled layers)."""
    return KERNEL_COSTS.get(kernels) or KERNEL_COSTS[cost_model(kernels)]


def attention_flops(layer: LayerSize, tokens: int, efficiency: float = ATTENTION_EFFICIENCY) -> float:
    """Score and value matmul FLOPs of one forward of one layer's attention, in matmul-speed equivalents."""
    context = tokens / 2
    if layer.shape.window:
        context = min(context, layer.shape.window)
    return 4.0 * tokens * context * layer.shape.q_width / efficiency


def layer_flops(layer: LayerSize, tokens: int, rank: int, attention_efficiency: float = ATTENTION_EFFICIENCY,
                grouped_expert_lora: bool = False, expert_efficiency: float = EXPERT_MATMUL_EFFICIENCY
                ) -> dict[str, float]:
    """Matmul-speed-equivalent FLOPs of one layer per pass: ``forward`` (also the recompute) and ``backward``.

    Expert FLOPs are divided by ``expert_efficiency`` (grouped GEMMs of ~tokens x top_k / E rows run
    below a large matmul's speed).
    """
    s = layer.shape
    expert_share = s.top_k / s.num_experts if s.num_experts else 0.0
    expert_active = s.expert_params * expert_share / expert_efficiency
    active = s.attention_params + s.dense_params + s.router_params + expert_active
    attention = attention_flops(layer, tokens, attention_efficiency)
    folded_params = layer.lora_folded_bytes / 2
    fold = 2.0 * rank * folded_params
    linear_lora = 2.0 * layer.lora_params * tokens
    weight_grad = 2.0 * folded_params * expert_share / expert_efficiency * tokens
    if grouped_expert_lora:
        # (x @ A_e^T) @ B_e^T per routed token, counted in linear_lora (an upper bound: every expert's LoRA
        # parameters for every token)
        fold = weight_grad = 0.0
    forward = 2.0 * active * tokens + attention + fold + linear_lora
    backward = 2.0 * active * tokens + 2 * attention + weight_grad + 2 * fold + 2 * linear_lora
    return {"forward": forward, "backward": backward}


def layer_pass_seconds(flops: float, bytes_read: float, link: LinkProfile) -> float:
    """Roofline time of one layer pass."""
    return max(flops / (link.matmul_tflops * TFLOP), bytes_read / (link.hbm_gbps * GB))


def compute_seconds(model: ModelSize, tokens: int, rank: int, codec: str, checkpointing: bool,
                    link: LinkProfile, kernels: str = "auto") -> dict[str, float]:
    """GPU time of the ``forward`` and ``backward`` passes and the ``optimizer`` step, and the host time to
    issue each pass (``cpu_forward``, ``cpu_backward``), in seconds."""
    costs = kernel_costs(kernels)
    forward = backward = 0.0
    dequant = link.dequant_gbps_for(codec) * DECODE_STEP_EFFICIENCY.get(codec, 1.0) * GB
    elementwise = costs.elementwise_s_per_token * tokens * CALIBRATION_HBM_GBPS / link.hbm_gbps
    per_pass = costs.gpu_s_per_layer_pass + elementwise
    grouped = kernels != "eager"
    for layer in model.layers:
        rows = tokens * layer.shape.top_k / layer.shape.num_experts if layer.shape.num_experts else 0.0
        flops = layer_flops(layer, tokens, rank, costs.layer_attention_efficiency(layer, tokens), grouped,
                            costs.expert_efficiency(rows))
        weights = layer.plain_bytes
        fold_bytes = 0.0 if grouped else 2.0 * layer.lora_folded_bytes
        decode = sum(t.plain_bytes for t in layer.tensors if t.compressed) / dequant
        forward += layer_pass_seconds(flops["forward"], weights + fold_bytes, link) + decode
        backward += layer_pass_seconds(flops["backward"], weights + 2 * fold_bytes, link) + decode
        if checkpointing:
            backward += layer_pass_seconds(flops["forward"], weights + fold_bytes, link)
        forward += per_pass
        backward += per_pass * (2 if checkpointing else 1)
    head_flops = 2.0 * model.hidden * model.vocab * tokens
    head_bytes = model.hidden * model.vocab * 2
    forward += layer_pass_seconds(head_flops, head_bytes, link)
    backward += layer_pass_seconds(head_flops, head_bytes, link)
    optimizer = model.lora_params * 16 * 2 / (link.hbm_gbps * GB)
    cpu_forward = costs.cpu_s_per_layer_pass * model.num_layers
    cpu_backward = cpu_forward * (2 if checkpointing else 1)
    return {"forward": forward, "backward": backward, "optimizer": optimizer, "cpu_forward": cpu_forward,
            "cpu_backward": cpu_backward}


def transfer_seconds(streamed: list[LayerSize], ring_slots: int, link: LinkProfile) -> dict[str, float]:
    """H2D copy time of the ``forward`` (every streamed layer) and ``backward`` (all but the last
    ``ring_slots`` streamed layers of the forward, which the backward reuses in place)."""
    rate = link.h2d_gbps * GB
    forward = sum(layer.encoded_bytes for layer in streamed) / rate
    reused = streamed[len(streamed) - min(ring_slots, len(streamed)):]
    backward = forward - sum(layer.encoded_bytes for layer in reused) / rate
    return {"forward": forward, "backward": backward}


PASSES = ("forward", "backward")


def pass_seconds(compute: dict[str, float], transfer: dict[str, float]) -> dict[str, float]:
    """Each pass's time: the longest of GPU compute, host issue (``cpu_<pass>``) and transfer."""
    return {p: max(compute[p], compute.get(f"cpu_{p}", 0.0), transfer[p]) for p in PASSES}


def side_seconds(compute: dict[str, float], transfer: dict[str, float]) -> dict[str, float]:
    """Total ``compute``, ``transfer`` and ``host`` seconds over both passes (the largest limits the step)."""
    return {"compute": sum(compute[p] for p in PASSES), "transfer": sum(transfer[p] for p in PASSES),
            "host": sum(compute.get(f"cpu_{p}", 0.0) for p in PASSES)}


def step_estimate(compute: dict[str, float], transfer: dict[str, float], tokens: int) -> dict[str, float | str]:
    """Step time (per pass max of GPU compute, host issue and transfer), tokens/s and the limiting side."""
    step = sum(pass_seconds(compute, transfer).values()) + compute["optimizer"]
    sides = side_seconds(compute, transfer)
    return {
        "step_seconds": step,
        "tokens_per_second": tokens / step if step > 0 else 0.0,
        "limited_by": max(sides, key=sides.get),
        "compute_seconds": sides["compute"] + compute["optimizer"],
        "transfer_seconds": sides["transfer"],
        "host_seconds": sides["host"],
    }
