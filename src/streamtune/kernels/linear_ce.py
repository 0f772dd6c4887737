"""Fused LM head + final-logit soft-cap + cross-entropy, one chunk of tokens at a time.

For each chunk of ``chunk_tokens`` labelled positions: ``logits = hidden @ W.T`` in the compute
dtype (bf16 matmul, fp32 accumulation), then one elementwise pass computes the soft-cap
``tanh(x / c) * c``, the row logsumexp, the target logit and, when a gradient is wanted, the
logit gradient ``(softmax - onehot) * (1 - tanh^2)`` in the compute dtype. The hidden-state (and,
if trainable, weight) gradient of the chunk is formed right away (``g @ W``), so the backward
only scales stored gradients by the incoming scalar: two LM-head matmuls per chunk instead of
the three of forward + checkpointed recompute + backward.

On CUDA the elementwise pass is compiled (Inductor fuses it into a reduction and a pointwise
kernel that read the compute-dtype logits), so no fp32 copy of a chunk's logits is ever stored;
the eager form (CPU, or ``compile_=False``) computes the same numbers with fp32 temporaries.
Imported lazily (by the loss, when the fused kernel is selected): it imports torch.
"""

from __future__ import annotations

from typing import Any

import torch

from streamtune.kernels.counters import count

_COMPILED: dict[str, Any] = {}


def softcap_ce_rows(logits: Any, targets: Any, softcap: float | None, with_grad: bool) -> tuple[Any, Any]:
    """Summed cross-entropy of ``logits`` [n, V] (soft-capped when ``softcap``) and its logit gradient.

    Returns:
        ``(loss_sum fp32 0-dim, grad [n, V] in logits.dtype or None)``.
    """
    z = logits.float()
    if softcap is not None:
        capped = torch.tanh(z / softcap)
        z = capped * softcap
    lse = torch.logsumexp(z, dim=-1)
    target_z = z.gather(1, targets[:, None]).squeeze(1)
    loss = (lse - target_z).sum()
    if not with_grad:
        return loss, None
    grad = torch.exp(z - lse[:, None])
    vocab = torch.arange(grad.shape[1], device=grad.device)
    grad = grad - (vocab[None, :] == targets[:, None]).to(grad.dtype)
    if softcap is not None:
        grad = grad * (1.0 - capped * capped)
    return loss, grad.to(logits.dtype)


def _elementwise(compile_: bool) -> Any:
    if not compile_:
        return softcap_ce_rows
    if "fn" not in _COMPILED:
        from streamtune.kernels.compiling import compile_fn

        _COMPILED["fn"] = compile_fn(softcap_ce_rows, dynamic=True)
    return _COMPILED["fn"]


def _linear_ce_forward(hidden: Any, weight: Any, targets: Any, softcap: float | None, chunk_tokens: int,
                       need: tuple[bool, bool], compile_: bool) -> tuple[Any, Any, Any]:
    rows = _elementwise(compile_)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
    with_grad = need[0] or need[1]
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start:start + chunk_tokens]
        logits = h @ weight.t()
        loss, grad = rows(logits, targets[start:start + chunk_tokens], softcap, with_grad)
        total += loss
        if need[0]:
            torch.matmul(grad, weight, out=grad_hidden[start:start + chunk_tokens])
        if need[1]:
            grad_weight += (grad.t() @ h).float()
        del logits, grad
    return total, grad_hidden, grad_weight


class LinearSoftcapCE(torch.autograd.Function):
    """See the module docstring; inputs are the labelled rows only."""

    @staticmethod
    def forward(ctx: Any, hidden: Any, weight: Any, targets: Any, softcap: float | None,
                chunk_tokens: int, compile_: bool) -> Any:
        need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]))
        total, grad_hidden, grad_weight = _linear_ce_forward(
            hidden, weight, targets, softcap, chunk_tokens, need, compile_)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Any) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.float()
        out_hidden = (grad_hidden * scale.to(grad_hidden.dtype)) if grad_hidden is not None else None
        out_weight = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return out_hidden, out_weight, None, None, None, None


def linear_softcap_ce_sum(hidden: Any, weight: Any, targets: Any, softcap: float | None,
                          chunk_tokens: int, compile_: bool = False) -> Any:
    """Summed cross-entropy of ``hidden @ weight.T`` (soft-capped) against ``targets``.

    Args:
        hidden: [n, H] labelled positions only (compute dtype).
        weight: [V, H] the LM head weight (same dtype as ``hidden``).
        targets: [n] int64 token ids (no ignored entries).
        softcap: the final logit soft-cap, or None.
        chunk_tokens: rows per chunk; bounds the logits to ``chunk_tokens * V`` in the compute dtype.
        compile_: compile the elementwise pass (CUDA).

    Returns:
        A 0-dim fp32 tensor, differentiable w.r.t. ``hidden`` (and ``weight`` if it requires grad).

    Raises:
        ValueError: ``chunk_tokens`` < 1 or mismatched shapes.
    """
    if chunk_tokens < 1:
        raise ValueError(f"train.loss_chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_softcap_ce_sum: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be [n, H] and [V, H]")
    count("fused_linear_ce")
    return LinearSoftcapCE.apply(hidden, weight.to(hidden.dtype), targets, softcap, chunk_tokens, compile_)
