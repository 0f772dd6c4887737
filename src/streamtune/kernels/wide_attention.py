"""Exact attention for wide heads (Gemma4's head_dim-512 global layers) as row-chunked cuBLAS GEMMs.

Problem: no fused attention kernel in torch serves head_dim 512 well. Flash and cuDNN SDPA have no kernel for it;
FlexAttention's Triton kernels fit only 64 x 32 tiles into shared memory at that width. On the H200 one layer
at 8192 tokens (16 query / 2 kv heads, causal) took 47 ms forward + backward with FlexAttention (81 TFLOP/s) and
82 ms with memory-efficient SDPA: five such layers were about 250 ms of the 26B step's 894 ms of GPU time.

Solution: split the queries into chunks of rows. A chunk's scores against every key it may see (causal: the keys
before the chunk's end) are one batched GEMM with fp32 output, so each row's whole softmax is in hand: no online
rescaling, the exact row maximum and log-sum-exp. The query heads that share one kv head are stacked as the rows
of one GEMM, so keys and values are never repeated for GQA. The forward keeps only the output and the
log-sum-exp (as flash attention does); the backward recomputes each chunk's scores and back-propagates through
them with five GEMMs. The elementwise part of a chunk (mask, softmax, the score gradient) is one compiled kernel
on CUDA. Chunks are as tall as ``max_score_elements`` fp32 scores allow (512 MiB by default), which bounds the
extra GPU memory: the backward holds a chunk's scores, their gradient and two bf16 copies (see
:func:`workspace_bytes`).

The mask is the model's own mask function (the ``mask_mod`` of the FlexAttention ``BlockMask`` transformers
builds: causal, packed-sample boundaries, padding), evaluated on each chunk's (query, key) grid, so nothing here
assumes which mask a model uses, except that it is causal: no key after a query is ever attended.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from streamtune.kernels.compiling import CompileFallback
from streamtune.kernels.counters import count

# fp32 scores of one chunk (all heads): 128 Mi elements = 512 MiB. On the H200 at 8192 tokens (16 / 2 heads,
# head_dim 512) one layer's forward + backward took 87, 59, 31 and 18 ms with 16, 32, 64 and 128 Mi: each chunk
# costs host time besides its GEMMs, so fewer, taller chunks win (benchmarks/results/flex_sweep-8192-d512-wide.json).
# The whole 26B step at 8192 tokens (int8, 24 GiB cap) did not follow: 0.781 s with 64 Mi, 0.784 s with 128 Mi.
MAX_SCORE_ELEMENTS = 128 * 2**20
_COMPILED: dict[str, Any] = {}
FALLBACK = CompileFallback("the wide-head attention's mask/softmax kernels",
                           "they run as separate torch ops from now on")


def workspace_bytes(num_heads: int, num_kv_heads: int, num_tokens: int, head_dim: int,
                    max_score_elements: int = MAX_SCORE_ELEMENTS) -> int:
    """GPU bytes the backward holds besides its inputs and outputs: one chunk's fp32 scores and score gradient
    with their bf16 copies (12 bytes a score), and the fp32 key and value gradient accumulators."""
    rows = chunk_rows(num_heads, num_tokens, max_score_elements)
    return num_heads * rows * num_tokens * 12 + 2 * num_kv_heads * num_tokens * head_dim * 4


def chunk_rows(num_heads: int, num_tokens: int, max_score_elements: int = MAX_SCORE_ELEMENTS) -> int:
    """Query rows per chunk: as many as keep ``num_heads x rows x num_tokens`` fp32 scores within the limit
    (at least 16 and a multiple of 16, at most ``num_tokens``)."""
    rows = max(16, max_score_elements // max(1, num_heads * num_tokens) // 16 * 16)
    return min(rows, num_tokens)


def _softmax_rows(scores: Any, keep: Any, scale: float, out_dtype: Any) -> tuple[Any, Any]:
    """Masked, scaled softmax of fp32 ``scores`` rows: (probabilities in ``out_dtype``, fp32 log-sum-exp)."""
    import torch

    logits = torch.where(keep, scores * scale, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    # a row with no visible key (left padding) gets zero probabilities, as FlexAttention's output has
    lse = torch.where(lse == float("-inf"), float("inf"), lse)
    return torch.exp(logits - lse.unsqueeze(-1)).to(out_dtype), lse


def _score_grads(scores: Any, keep: Any, lse: Any, grad_probs: Any, delta: Any, scale: float,
                 out_dtype: Any) -> tuple[Any, Any]:
    """Recomputed probabilities and the gradient of the raw scores (both in ``out_dtype``)."""
    import torch

    probs = torch.exp(torch.where(keep, scores * scale, float("-inf")) - lse.unsqueeze(-1))
    grad_scores = probs * (grad_probs - delta.unsqueeze(-1)) * scale
    return probs.to(out_dtype), grad_scores.to(out_dtype)


def _elementwise(name: str, fn: Callable[..., Any], device_type: str) -> Callable[..., Any]:
    """``fn`` compiled once per process on CUDA (dynamic shapes: chunks differ in width); eager elsewhere, and
    from the first compile failure on (with a warning), as the other compiled pieces do."""
    if device_type != "cuda" or FALLBACK.broken:
        return fn
    if name not in _COMPILED:
        from streamtune.kernels.compiling import compile_fn  # looked up per call: tests replace it

        _COMPILED[name] = compile_fn(fn, dynamic=True)
    return functools.partial(FALLBACK.run, _COMPILED[name], fn)


def _matmul(a: Any, b: Any) -> Any:
    """``a @ b`` (batched) with fp32 output: cuBLAS accumulates bf16 in fp32 and writes fp32 on CUDA; elsewhere
    (the CPU has no mixed-dtype batched GEMM) the inputs are upcast."""
    import torch

    if a.dtype == torch.float32 or a.device.type != "cuda":
        return torch.bmm(a.float(), b.float())
    return torch.bmm(a, b, out_dtype=torch.float32)


def chunk_mask(mask_mod: Any, batch: int, row_start: int, row_end: int, num_keys: int, device: Any) -> Any:
    """``mask_mod`` on the grid rows ``[row_start, row_end)`` x keys ``[0, num_keys)``: bool ``[batch, rows, keys]``.

    Without a mask function the mask is causal. transformers' mask functions broadcast over index tensors; one
    that does not is evaluated through FlexAttention's ``create_mask`` (vmap) instead.
    """
    import torch

    rows = torch.arange(row_start, row_end, device=device)
    keys = torch.arange(num_keys, device=device)
    if mask_mod is None:
        return (keys[None, :] <= rows[:, None]).expand(batch, -1, -1)
    try:
        keep = mask_mod(torch.arange(batch, device=device)[:, None, None], torch.zeros((), dtype=torch.long,
                        device=device), rows[None, :, None], keys[None, None, :])
        return keep.expand(batch, row_end - row_start, num_keys)
    except Exception:  # a mask function written for vmap only
        from torch.nn.attention.flex_attention import create_mask

        def shifted(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return mask_mod(b, h, q + row_start, kv)

        return create_mask(shifted, batch, 1, row_end - row_start, num_keys, device=device)[:, 0]


class _WideAttention:
    """Shapes of one call: ``[B, H, T, D]`` queries, ``[B, Hk, T, D]`` keys and values, ``g = H / Hk``."""

    def __init__(self, query: Any, key: Any, mask_mod: Any, scale: float, max_score_elements: int):
        self.batch, self.num_heads, self.num_tokens, self.head_dim = query.shape
        self.num_kv_heads = key.shape[1]
        self.group = self.num_heads // self.num_kv_heads
        self.mask_mod, self.scale = mask_mod, scale
        self.rows = chunk_rows(self.num_heads, self.num_tokens, max_score_elements)

    def chunks(self) -> list[tuple[int, int]]:
        return [(start, min(start + self.rows, self.num_tokens)) for start in range(0, self.num_tokens, self.rows)]

    def stack(self, tensor: Any, start: int, end: int) -> Any:
        """Rows ``[start, end)`` of ``[B, H, T, D]`` as ``[B * Hk, g * rows, D]`` (the heads of a kv head stacked)."""
        return tensor[:, :, start:end].reshape(self.batch * self.num_kv_heads, self.group * (end - start), -1)

    def unstack(self, stacked: Any, start: int, end: int) -> Any:
        return stacked.view(self.batch, self.num_heads, end - start, -1)

    def keep(self, start: int, end: int, device: Any) -> Any:
        """The chunk's mask broadcast to the stacked scores' ``[B * Hk, g * rows, keys]`` as a 5-D view."""
        mask = chunk_mask(self.mask_mod, self.batch, start, end, end, device)
        return mask[:, None, None]

    def view5(self, scores: Any, start: int, end: int) -> Any:
        return scores.view(self.batch, self.num_kv_heads, self.group, end - start, -1)


def _forward(ctx: Any, query: Any, key: Any, value: Any, mask_mod: Any, scale: float,
             max_score_elements: int) -> Any:
    import torch

    plan = _WideAttention(query, key, mask_mod, scale, max_score_elements)
    flat = plan.batch * plan.num_kv_heads
    keys = key.reshape(flat, plan.num_tokens, plan.head_dim)
    values = value.reshape(flat, plan.num_tokens, -1)
    out = query.new_empty(plan.batch, plan.num_heads, plan.num_tokens, value.shape[-1])
    lse = query.new_empty(plan.batch, plan.num_heads, plan.num_tokens, dtype=torch.float32)
    softmax = _elementwise("softmax", _softmax_rows, query.device.type)
    for start, end in plan.chunks():
        scores = _matmul(plan.stack(query, start, end), keys[:, :end].transpose(1, 2))
        probs, chunk_lse = softmax(plan.view5(scores, start, end), plan.keep(start, end, query.device), scale,
                                   value.dtype)
        del scores
        out[:, :, start:end] = plan.unstack(torch.bmm(probs.view(flat, -1, end), values[:, :end]), start, end)
        lse[:, :, start:end] = chunk_lse.reshape(plan.batch, plan.num_heads, end - start)
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.plan = plan
    return out


def _backward(ctx: Any, grad_out: Any) -> tuple[Any, ...]:
    import torch

    query, key, value, out, lse = ctx.saved_tensors
    plan: _WideAttention = ctx.plan
    flat = plan.batch * plan.num_kv_heads
    keys = key.reshape(flat, plan.num_tokens, plan.head_dim)
    values = value.reshape(flat, plan.num_tokens, -1)
    grad_query = torch.empty_like(query, memory_format=torch.contiguous_format)
    grad_keys = torch.zeros(keys.shape, dtype=torch.float32, device=key.device)
    grad_values = torch.zeros(values.shape, dtype=torch.float32, device=value.device)
    score_grads = _elementwise("score_grads", _score_grads, query.device.type)
    for start, end in plan.chunks():
        rows = plan.stack(query, start, end)
        grad_rows = plan.stack(grad_out, start, end)
        # delta = rowsum(dO * O): the softmax backward's correction term, per query row and head
        delta = (grad_rows.float() * plan.stack(out, start, end).float()).sum(-1)
        scores = _matmul(rows, keys[:, :end].transpose(1, 2))
        grad_probs = _matmul(grad_rows, values[:, :end].transpose(1, 2))
        probs, grad_scores = score_grads(
            plan.view5(scores, start, end), plan.keep(start, end, query.device),
            lse[:, :, start:end].reshape(plan.batch, plan.num_kv_heads, plan.group, end - start),
            plan.view5(grad_probs, start, end), delta.view(plan.batch, plan.num_kv_heads, plan.group, -1), plan.scale,
            query.dtype)
        del scores, grad_probs  # before the next chunk's are allocated
        probs, grad_scores = probs.view(flat, -1, end), grad_scores.view(flat, -1, end)
        grad_values[:, :end] += _matmul(probs.transpose(1, 2), grad_rows)
        grad_keys[:, :end] += _matmul(grad_scores.transpose(1, 2), rows)
        grad_query[:, :, start:end] = plan.unstack(torch.bmm(grad_scores, keys[:, :end]), start, end)
    return (grad_query, grad_keys.view(key.shape).to(key.dtype), grad_values.view(value.shape).to(value.dtype),
            None, None, None)


def _function() -> Any:
    import torch

    if "function" not in _COMPILED:
        _COMPILED["function"] = type("WideAttentionFunction", (torch.autograd.Function,),
                                     {"forward": staticmethod(_forward), "backward": staticmethod(_backward)})
    return _COMPILED["function"]


def wide_attention(query: Any, key: Any, value: Any, mask_mod: Any = None, scale: float | None = None,
                   max_score_elements: int = MAX_SCORE_ELEMENTS) -> Any:
    """Exact causal attention by row chunks: ``[B, H, T, D]`` queries, ``[B, Hk, T, D]`` keys and values
    (``H`` a multiple of ``Hk``: grouped-query attention), ``[B, H, T, Dv]`` output.

    Args:
        mask_mod: FlexAttention mask function ``(batch, head, query, key) -> keep``, evaluated per chunk (the
            same for every head); None: plain causal. It must mask every key after its query.
        scale: score scale (None: ``1 / sqrt(D)``).
        max_score_elements: fp32 scores per chunk (all heads); sets the chunk height and the extra memory.

    Raises:
        ValueError: query and key lengths differ, or ``H`` is not a multiple of ``Hk``.
    """
    import math

    if query.shape[2] != key.shape[2]:
        raise ValueError(f"wide_attention: {query.shape[2]} queries against {key.shape[2]} keys; it serves "
                         "training (no KV cache) only")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"wide_attention: {query.shape[1]} query heads are not a multiple of {key.shape[1]} kv heads")
    count("wide_attention")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return _function().apply(query, key, value, mask_mod, scale, max_score_elements)
