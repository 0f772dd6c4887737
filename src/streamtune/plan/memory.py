"""GPU and host memory model of one training step. All results in bytes.

Assumptions (each is one function, so the device benchmark can calibrate it):

- Activations are bf16 (2 bytes); LoRA weights fp32 with fp32 grads and two fp32 AdamW states (16 B each).
- Gradient checkpointing is non-reentrant and per decoder layer: the forward keeps each layer's input;
  the backward recomputes one layer at a time, so only the worst layer's working set is live at once.
- A fused expert parameter adapted by LoRA is folded by PEFT into a bf16 copy ``W + B@A`` on every forward
  and receives a full-size bf16 weight gradient in the backward; the fast kernels compute its low-rank path
  as grouped products instead (``streamtune.kernels.experts``: no fold, no full-size gradient).
- The LM-head loss runs in chunks of ``loss_chunk_tokens`` with fp32 logits, their softmax and their gradient;
  the fused loss of the fast kernels (``train.kernels: auto``) keeps one chunk's logits and their gradient in
  the compute dtype, and FlexAttention's block masks replace the dense ``tokens x tokens`` masks.
- Resident decoder layers keep their weights on the GPU in the codec; with int8/nf4 they are decoded just in
  time into one shared bf16 workspace of the largest resident layer's size.
- The CUDA context (0.5 GiB) lives outside torch's allocator; allocator slack is 5 % of the allocated peak.
"""

from __future__ import annotations

from streamtune.distributed import local_sum
from streamtune.plan.sizing import LayerSize, ModelSize

GIB = 2**30
ACT_BYTES = 2
LORA_STATE_BYTES_PER_PARAM = 16
CUDA_CONTEXT_BYTES = GIB // 2
ALLOCATOR_SLACK_FRACTION = 0.05
# fp32 [chunk, vocab] tensors alive at the loss's peak: the chunk's recompute in the backward keeps the
# soft-capped logits, tanh's output and log-softmax's output, and the backward adds its gradients.
# 3 under-counted: gemma4-26b-a4b at 2048 tokens ran out of a 24 GiB cap on an H200 (2026-11-28).
LOGITS_COPIES = 5
# bf16 [chunk, vocab] tensors of the fused loss at its peak: the logits and their gradient.
FUSED_LOGITS_COPIES = 2
# Host RAM of one training process besides the packed weights (Python, torch, CUDA context, compiled kernels,
# malloc heap), after the warm-up steps: 1.84 GB for one rank (its PSS less the packed weights; 26B preset, int8,
# H200, session 13: benchmarks/results/multi_gpu-NVIDIA_H200-20261201-021618-dp1-dp2.json). Session 9's 2.5 GB
# per rank counted the compile workers in it.
HOST_RUNTIME_BYTES = int(1.85e9)
# More per rank under torchrun with NCCL (its communicator and library pages): two ranks held 4.12 GB beside their
# one shared copy in the same run, 2.06 GB each.
PROCESS_GROUP_HOST_BYTES = int(0.22e9)
# With train.dist_backend gloo a rank loads no NCCL. Measured (two gloo ranks on one H200, 26B preset, int8,
# session 16: benchmarks/results/multi_gpu-NVIDIA_H200-20261201-073344-dp1-dp2-one-gpu-gloo.json): the second rank
# added 1.52 GB of PSS, less than one rank's runtime, so a gloo rank is counted with its share of the shared
# gradient-sum slots only (streamtune.distributed.local_sum: two sets of one 16 MiB chunk per rank).
GLOO_GROUP_HOST_BYTES = local_sum.NUM_SETS * local_sum.CHUNK_BYTES
# PSS of one Inductor compile worker. The pool (min(32, cores) processes for the whole host) runs while the first
# steps compile; training stops it after step 2. In the same run 32 workers held 2.25 GB (one rank) and 1.86 GB
# (two ranks of 16) beside the launcher.
COMPILE_WORKER_HOST_BYTES = int(70e6)
# Host components that never coexist: loading's staging ends before the first step starts the compile workers.
TRANSIENT_HOST_COMPONENTS = ("staging", "compile_workers")
MASK_COPIES = 3


def boundary_activation_bytes(model: ModelSize, tokens: int) -> int:
    """Decoder-layer inputs kept by checkpointing: ``num_layers * tokens * hidden * 2``."""
    return model.num_layers * tokens * model.hidden * ACT_BYTES


def layer_saved_activation_bytes(layer: LayerSize, tokens: int, fused: bool = False) -> int:
    """Tensors autograd keeps for one decoder layer's backward (bf16 unless noted).

    Norms (RMSNorm, q/k/v norms): the fp32 input and the normalised value (see ``LayerShape.norm_elements``).
    Attention: projected q/k/v, the attention inputs q/k/v, its output, the residual and fp32 log-sum-exp.
    Dense MLP: gate, up, activation, product (4 x width). MoE: fp32 router logits and probabilities, and
    per routed token (top_k per token) the permuted input, gate_up output, activation, product, down
    output and weighted output (3 x hidden + 4 x expert FFN). With the fast experts (``fused``) a routed token
    keeps its gate/up output and its expert output (2 x expert FFN + hidden): frozen expert weights need no
    saved inputs, and the weighting is fused into the combine; expert LoRA keeps its two inputs besides
    (hidden + expert FFN). This count is not measured apart. On the CPU with frozen weights (tiny Gemma4 and
    Qwen3-MoE, whole decoder, 256 and 1024 tokens) the fast experts kept 1-17 % more than the stock ones (the stock
    count above is calibrated with trainable weights). On the H200 (26B, int8, 8192 tokens) the fast path's GPU
    peak was 1.64 GiB below the stock experts' (benchmarks/results/profile_step-NVIDIA_H200-auto-stages-*.json);
    this count fits the measured peaks.
    """
    s = layer.shape
    per_token = s.norm_elements + 3 * s.q_width + 2 * s.kv_width + s.hidden + 4 * s.dense_width
    if s.num_experts and fused:
        per_routed = 2 * s.expert_ffn + s.hidden + (s.hidden + s.expert_ffn if layer.lora_folded_bytes else 0)
        per_token += 4 * s.num_experts + s.top_k * per_routed
    elif s.num_experts:
        per_token += 4 * s.num_experts + s.top_k * (3 * s.hidden + 4 * s.expert_ffn)
    lse_bytes = 4 * s.num_heads * tokens
    return per_token * tokens * ACT_BYTES + lse_bytes


def layer_backward_transient_bytes(layer: LayerSize, tokens: int, fused: bool = False) -> int:
    """Gradients of activations live while one layer runs backward: two of its widest activation; with the
    fast experts (``fused``) the routed rows' gradient and the gate/up gradient of the routed tokens (the stock
    experts' fp32 weighted rows and their gradient do not exist there)."""
    s = layer.shape
    widest = max(s.hidden, s.q_width, 2 * s.dense_width, s.top_k * 2 * s.expert_ffn, s.top_k * s.hidden)
    if fused and s.num_experts:
        return max((widest + s.top_k * 2 * s.expert_ffn) * tokens * ACT_BYTES, wide_attention_bytes(layer, tokens))
    return max(2 * widest * tokens * ACT_BYTES, wide_attention_bytes(layer, tokens) if fused else 0)


def wide_attention_bytes(layer: LayerSize, tokens: int) -> int:
    """The backward of a head wider than 256 on the fast path at long sequences (row-chunked GEMM attention,
    ``streamtune.kernels.wide_attention``): its chunk workspace plus the q/k/v gradients; 0 elsewhere."""
    from streamtune.kernels.select import wide_attention_applies
    from streamtune.kernels.wide_attention import workspace_bytes

    s = layer.shape
    head_dim = s.head_dim
    if not wide_attention_applies(head_dim, tokens):
        return 0
    num_kv_heads = max(1, s.kv_width // 2 // head_dim)
    return workspace_bytes(s.num_heads, num_kv_heads, tokens, head_dim) + (s.q_width + s.kv_width) * tokens * ACT_BYTES


def lora_fold_bytes(layer: LayerSize) -> int:
    """PEFT's folded fused weights of one layer plus the largest full-size weight gradient."""
    return layer.lora_folded_bytes + layer.lora_folded_max_bytes


def attention_mask_bytes(model: ModelSize, tokens: int, fused: bool = False) -> int:
    """Additive bf16 ``tokens x tokens`` masks built once per step when some layers use a sliding window
    (three were measured for Gemma4 on the CPU); full causal attention alone uses none, nor do the block
    masks of the fast path (``fused``: a few bytes per 128 x 128 block)."""
    sliding = any("sliding" in t for t in model.layer_types) and not fused
    return MASK_COPIES * tokens * tokens * ACT_BYTES if sliding else 0


def layer_recompute_bytes(layer: LayerSize, tokens: int, fused: bool = False) -> int:
    """Working set of recomputing and back-propagating one layer (``fused``: no PEFT fold)."""
    return (layer_saved_activation_bytes(layer, tokens, fused) + layer_backward_transient_bytes(layer, tokens, fused)
            + (0 if fused else lora_fold_bytes(layer)))


def loss_bytes(model: ModelSize, tokens: int, loss_chunk_tokens: int, fused: bool = False) -> int:
    """Chunked LM-head loss: ``LOGITS_COPIES`` fp32 ``[chunk, vocab]`` tensors, or with the ``fused`` loss
    ``FUSED_LOGITS_COPIES`` in bf16."""
    chunk = min(tokens, loss_chunk_tokens)
    if fused:
        return chunk * model.vocab * ACT_BYTES * FUSED_LOGITS_COPIES
    return chunk * model.vocab * 4 * LOGITS_COPIES


def activation_bytes(model: ModelSize, tokens: int, loss_chunk_tokens: int, checkpointing: bool,
                     fused: bool = False) -> dict[str, int]:
    """Activation components at ``tokens`` tokens per micro-batch (``fused``: the fast kernels' loss and masks).

    Returns:
        ``boundaries`` (kept layer inputs, or every layer's saved tensors without checkpointing),
        ``recompute`` (the worst layer's working set), ``loss`` (with the fused loss: the part of its chunk beyond
        the recompute working set) and ``masks``.
    """
    worst = max(model.layers, key=lambda layer: layer_recompute_bytes(layer, tokens, fused))
    fold = (lambda layer: 0) if fused else lora_fold_bytes
    if checkpointing:
        kept = boundary_activation_bytes(model, tokens)
        recompute = layer_recompute_bytes(worst, tokens, fused)
    else:
        kept = sum(layer_saved_activation_bytes(layer, tokens, fused) + fold(layer) for layer in model.layers)
        recompute = layer_backward_transient_bytes(worst, tokens, fused) + (0 if fused else worst.lora_folded_max_bytes)
    loss = loss_bytes(model, tokens, loss_chunk_tokens, fused)
    if fused:
        # the fused loss computes its gradient chunk by chunk and frees each chunk's logits before the first
        # layer recomputes: the peak holds the larger of the two working sets, not both
        loss = max(0, loss - recompute)
    return {"boundaries": kept, "recompute": recompute, "loss": loss, "masks": attention_mask_bytes(model, tokens, fused)}


def lora_state_bytes(model: ModelSize) -> int:
    """LoRA parameters, gradients and AdamW states in fp32: 16 bytes per trainable parameter."""
    return model.lora_params * LORA_STATE_BYTES_PER_PARAM


def ring_bytes(streamed: list[LayerSize], ring_slots: int, codec: str) -> int:
    """GPU ring: ``ring_slots`` slots of the largest streamed layer, encoded (the engine's SlotRing)."""
    if not streamed or ring_slots <= 0:
        return 0
    return ring_slots * max(layer.encoded_bytes for layer in streamed)


def resident_layer_bytes(resident: list[LayerSize]) -> int:
    """Resident decoder layers, kept in the codec's encoding."""
    return sum(layer.encoded_bytes for layer in resident)


def decode_workspace_bytes(layers: list[LayerSize], codec: str) -> int:
    """The one bf16 decode workspace that streamed and resident layers share (int8/nf4 only).

    Only one decoder layer is bound at a time, so one workspace of the largest layer's
    compressed tensors serves all of them.
    """
    if codec == "bf16" or not layers:
        return 0
    return max(layer.decoded_bytes for layer in layers)


def gpu_components_bytes(
    model: ModelSize, resident: list[LayerSize], streamed: list[LayerSize], ring_slots: int, codec: str,
    tokens: int, loss_chunk_tokens: int, checkpointing: bool, kernels: str = "auto",
) -> dict[str, int]:
    """Every GPU memory component of a step, in bytes (the peak is their sum); ``kernels`` as ``train.kernels``."""
    parts = {
        "embeddings_head_norm": model.resident_other_bytes,
        "resident_layers": resident_layer_bytes(resident),
        "decode_workspace": decode_workspace_bytes(resident + streamed, codec),
        "ring": ring_bytes(streamed, ring_slots, codec),
        "lora_state": lora_state_bytes(model),
    }
    fused = kernels != "eager"
    for key, value in activation_bytes(model, tokens, loss_chunk_tokens, checkpointing, fused).items():
        parts[f"activations_{key}"] = value
    parts["allocator_slack"] = int(sum(parts.values()) * ALLOCATOR_SLACK_FRACTION)
    parts["cuda_context"] = CUDA_CONTEXT_BYTES
    return parts


def host_components_bytes(model: ModelSize, streamed: list[LayerSize], local_ranks: int = 1,
                          shared: bool = True, num_compile_workers: int = 0,
                          dist_backend: str = "auto") -> dict[str, int]:
    """Host memory of one host: pinned packed buffers of every decoder layer, loading staging, process runtime
    and, while the first steps compile, ``num_compile_workers`` Inductor workers.

    The engine keeps the one host copy of every layer (resident ones too), so it can re-place
    layers without reloading; ``streamed`` does not change the host footprint. With ``local_ranks``
    processes on the host (torchrun), ``shared`` (the default) means they map one copy that local
    rank 0 alone loaded (``streamtune.distributed.shared_host``); each rank adds its runtime and its share of
    the process group (``dist_backend``: NCCL's unless ``gloo``). The peak counts the larger of the two transient components
    (:data:`TRANSIENT_HOST_COMPONENTS`), not both.
    """
    copies = 1 if shared else local_ranks
    largest_layer = max((layer.plain_bytes for layer in model.layers), default=0)
    largest_other = max((t.plain_bytes for t in model.other), default=0)
    group_bytes = GLOO_GROUP_HOST_BYTES if dist_backend == "gloo" else PROCESS_GROUP_HOST_BYTES
    per_rank = HOST_RUNTIME_BYTES + (group_bytes if local_ranks > 1 else 0)
    return {
        "pinned_weights": copies * sum(layer.encoded_bytes for layer in model.layers),
        "staging": copies * max(largest_layer, largest_other),
        "runtime": local_ranks * per_rank,
        "compile_workers": num_compile_workers * COMPILE_WORKER_HOST_BYTES,
    }


def host_peak_bytes(components: dict[str, int]) -> int:
    """Peak of :func:`host_components_bytes`: the lasting components plus the larger transient one."""
    transient = [components.get(key, 0) for key in TRANSIENT_HOST_COMPONENTS]
    return sum(v for k, v in components.items() if k not in TRANSIENT_HOST_COMPONENTS) + max(transient)


def num_compile_workers(kernels: str, local_ranks: int = 1) -> int:
    """Inductor's compile workers on a host of ``local_ranks`` processes running ``train.kernels`` (none with
    ``eager``: nothing compiles): each process's pool (``hostmem.compile_workers_per_process``), all of them."""
    if kernels == "eager":
        return 0
    from streamtune.hostmem import compile_workers_per_process

    return local_ranks * compile_workers_per_process(local_ranks)
