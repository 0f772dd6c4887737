"""Which fast kernels a device gets: decided from ``train.kernels`` and the CUDA capability.

Pure Python (no torch import at module level) so the choice is testable on the CPU by passing a
fake ``capability``. ``eager`` is the stock HF path everywhere; ``auto`` takes each fast piece
where it applies and falls back to the stock path where it does not:

- LoRA in the compute dtype: wherever the compute dtype is not float32 (on the CPU in fp32 the
  stock and fast forms are the same computation, so the stock one is kept).
- Fused linear + soft-capped cross-entropy: every device (pure torch); its elementwise part is
  compiled (one reduction + one pointwise kernel per chunk) on CUDA only.
- FlexAttention: CUDA only (it has no CPU backward). The default Triton configs need more shared
  memory than a head_dim-512 layer can have; smaller ``kernel_options`` are chosen per capability.
- ``torch._grouped_mm``: the fast path exists on sm90 / sm100 only.
- Expert LoRA (``lora.target_parameters`` on fused experts) as its own grouped low-rank product:
  every device. Route ``grouped_mm`` (no host sync) on CUDA sm80+ (``torch._grouped_mm`` runs
  there, as a per-expert loop inside it below sm90), ``loop`` (exact, one offsets read per
  product) on the CPU and older cards.
- Fused RMSNorm and gated activation (:mod:`.fused`, compiled): CUDA only (on the CPU Inductor
  needs a C++ compiler and minutes of compiling for no speed-up; tests force it on).
- Experts without LoRA through streamtune's routed forward (``fast_experts``): CUDA sm80+, where the
  ``grouped_mm`` route runs (the ``loop`` route reads offsets on the host once per product).
- Row-chunked GEMM attention for heads wider than 256 (:mod:`.wide_attention`): CUDA sm80+ (where the
  FlexAttention path runs), at ``WIDE_ATTENTION_MIN_TOKENS`` tokens or more.
- Regional compile of whole decoder layers (:mod:`.regional`, ``train.compile_layers``): CUDA sm80+ unless
  turned off (measured on the H200, 26B preset, int8, 24 GiB cap: 2048 tokens 0.61 -> 0.34 s per step,
  8192 tokens 1.03 -> 0.92 s; the layers' Python ran once per call, it is now one compiled call per
  graph); on the CPU only when asked for (minutes of compiling there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamtune.config import KERNEL_MODES

# Capabilities with ~228 KB of shared memory per block and a grouped_mm fast path.
_LARGE_SMEM_CAPABILITIES = ((9, 0), (10, 0))
# Measured on the H200 (sm90), one layer at 8192 tokens, forward + backward
# (benchmarks/flex_sweep.py; benchmarks/results/flex_sweep-8192-*.json):
# - head_dim 512 (16 q / 2 kv heads, causal): the default configs ask for 262,144 B of shared memory
#   (limit 232,448). 64 x 32 tiles with two pipeline stages: 47.3 ms, against 65.4 ms with one stage and
#   82.0 ms for memory-efficient SDPA.
# - head_dim 256 (16 q / 8 kv heads, window 1024): 128 x 64 forward tiles, two stages, eight warps: 2.8 ms,
#   against 3.4 ms with Triton's defaults.
# Heads wider than WIDE_HEAD_DIM at WIDE_ATTENTION_MIN_TOKENS tokens or more: row-chunked GEMM attention
# (wide_attention.py; one head_dim-512 layer on the H200: 6.0 against FlexAttention's 13.0 ms at 4096 tokens,
# 2.4 against 4.7 ms at 2048, where the step waits on the host and the GEMM path launches more kernels).
WIDE_HEAD_DIM = 256
WIDE_ATTENTION_MIN_TOKENS = 4096
_HEAD_DIM_512_OPTIONS_SM90 = {
    "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32,
    "num_stages": 2, "num_warps": 8,
}
_HEAD_DIM_256_OPTIONS_SM90 = {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 2, "num_warps": 8}
# Consumer cards (sm86 / sm89: ~100 KB of shared memory per block): small tiles for every head dim
# above 128, one pipeline stage.
_SMALL_SMEM_OPTIONS = {
    "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16,
    "num_stages": 1, "num_warps": 4,
}


@dataclass(frozen=True)
class KernelChoice:
    """The fast pieces a run uses (all False: the stock HF path).

    Attributes:
        mode: the ``train.kernels`` value this was chosen from.
        device_type: ``cpu`` or ``cuda``.
        capability: CUDA compute capability ``(major, minor)``, or None off CUDA.
        lora_compute_dtype: LoRA products in the activations' dtype (fp32 master weights kept).
        fused_linear_ce: LM head + soft-cap + cross-entropy as one chunked autograd function.
        compile_loss: compile the loss's elementwise part (CUDA only).
        flex_attention: attention through compiled FlexAttention with block masks.
        grouped_mm: ``torch._grouped_mm`` has a fast path on this device.
        flex_options: FlexAttention ``kernel_options`` per head dim (absent: the defaults).
        expert_lora: route of the expert-LoRA forward (``grouped_mm`` or ``loop``); None: PEFT's.
        fused_norm_act: RMSNorms and gated MLP activations through compiled fused kernels.
        compile_layers: each decoder layer's forward through one shared ``torch.compile``.
        fast_experts: experts modules without LoRA through streamtune's routed forward, and every experts
            module's routing-weighted sum as one compiled kernel (CUDA sm80+; measured on the H200, 26B preset,
            8192 tokens: 1.26 -> 1.11 s per step).
        wide_attention_min_tokens: heads wider than 256 at this many tokens or more go to the row-chunked GEMM
            attention (:mod:`.wide_attention`) instead of FlexAttention; None: never.
    """

    mode: str = "eager"
    device_type: str = "cpu"
    capability: tuple[int, int] | None = None
    lora_compute_dtype: bool = False
    fused_linear_ce: bool = False
    compile_loss: bool = False
    flex_attention: bool = False
    grouped_mm: bool = False
    flex_options: dict[int, dict[str, int]] = field(default_factory=dict)
    expert_lora: str | None = None
    fused_norm_act: bool = False
    compile_layers: bool = False
    fast_experts: bool = False
    wide_attention_min_tokens: int | None = None

    def kernel_options(self, head_dim: int) -> dict[str, int] | None:
        """FlexAttention ``kernel_options`` for a layer of ``head_dim`` (None: Triton's defaults)."""
        for limit in sorted(self.flex_options):
            if head_dim <= limit:
                return dict(self.flex_options[limit]) or None
        return None

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (for logs and placement.json)."""
        return {
            "mode": self.mode, "device_type": self.device_type,
            "capability": list(self.capability) if self.capability else None,
            "lora_compute_dtype": self.lora_compute_dtype, "fused_linear_ce": self.fused_linear_ce,
            "compile_loss": self.compile_loss, "flex_attention": self.flex_attention, "grouped_mm": self.grouped_mm,
            "expert_lora": self.expert_lora,
            "fused_norm_act": self.fused_norm_act, "compile_layers": self.compile_layers,
            "fast_experts": self.fast_experts, "wide_attention_min_tokens": self.wide_attention_min_tokens,
        }


def flex_options_for(capability: tuple[int, int]) -> dict[int, dict[str, int]]:
    """FlexAttention ``kernel_options`` by the largest head dim they serve, for a CUDA capability.

    sm90 / sm100: Triton's defaults up to head_dim 128, the measured H200 options above (sm100 has the same
    shared memory; its speed with them is not measured). Other cards (smaller shared memory; not measured
    here): defaults up to 128, small tiles above.
    """
    if tuple(capability) in _LARGE_SMEM_CAPABILITIES:
        return {128: {}, 256: dict(_HEAD_DIM_256_OPTIONS_SM90), 512: dict(_HEAD_DIM_512_OPTIONS_SM90)}
    return {128: {}, 512: dict(_SMALL_SMEM_OPTIONS)}


def select_kernels(mode: str, device_type: str, compute_dtype: str = "bfloat16",
                   capability: tuple[int, int] | None = None, compile_layers: bool | None = None) -> KernelChoice:
    """The fast pieces for ``train.kernels=mode`` on a device.

    Args:
        mode: ``auto`` or ``eager``.
        device_type: ``cpu`` or ``cuda``.
        compute_dtype: the model's dtype name (``bfloat16``, ``float16``, ``float32``).
        capability: CUDA ``(major, minor)``; required for ``cuda`` (tests pass fake ones).
        compile_layers: ``train.compile_layers`` (regional compile; ignored with ``eager``); None: on for CUDA
            sm80+, off elsewhere.

    Returns:
        A :class:`KernelChoice`.

    Raises:
        ValueError: unknown mode, or a CUDA device without a capability.
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"train.kernels: {mode!r} is not one of {', '.join(KERNEL_MODES)}")
    if mode == "eager":
        return KernelChoice(mode=mode, device_type=device_type, capability=capability)
    low_precision = compute_dtype != "float32"
    if device_type != "cuda":
        return KernelChoice(mode=mode, device_type=device_type, lora_compute_dtype=low_precision,
                            fused_linear_ce=True, expert_lora="loop", compile_layers=bool(compile_layers))
    if capability is None:
        raise ValueError("select_kernels: a CUDA device needs its compute capability")
    capability = (int(capability[0]), int(capability[1]))
    # FlexAttention's Triton kernels need sm80+ (bf16 MMA), and torch._grouped_mm runs there: older cards keep
    # the stock attention and experts, and expert LoRA takes the loop route
    sm80 = capability >= (8, 0)
    return KernelChoice(
        mode=mode, device_type=device_type, capability=capability, lora_compute_dtype=low_precision,
        fused_linear_ce=True, compile_loss=True, flex_attention=sm80,
        grouped_mm=capability in _LARGE_SMEM_CAPABILITIES, flex_options=flex_options_for(capability) if sm80 else {},
        expert_lora="grouped_mm" if sm80 else "loop",
        fused_norm_act=True, compile_layers=sm80 if compile_layers is None else compile_layers, fast_experts=sm80,
        wide_attention_min_tokens=WIDE_ATTENTION_MIN_TOKENS if sm80 else None,
    )


def wide_attention_applies(head_dim: int, tokens: int, min_tokens: int | None = WIDE_ATTENTION_MIN_TOKENS) -> bool:
    """Whether a layer of ``head_dim`` at ``tokens`` per sequence takes the row-chunked GEMM attention
    (``min_tokens``: the choice's ``wide_attention_min_tokens``; None: never)."""
    return min_tokens is not None and head_dim > WIDE_HEAD_DIM and tokens >= min_tokens


def select_for_device(mode: str, device: Any, dtype: Any, compile_layers: bool | None = None) -> KernelChoice:
    """:func:`select_kernels` for a real torch device and dtype (queries the CUDA capability)."""
    import torch

    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return select_kernels(mode, device.type, str(dtype).removeprefix("torch."), capability, compile_layers)
