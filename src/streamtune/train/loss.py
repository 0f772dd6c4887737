"""Chunked LM-head loss: cross-entropy without materialising the full [tokens, vocab] fp32 logits.

The decoder runs to its final hidden states; the loss then takes the positions that carry a label,
and for each chunk of ``chunk_tokens`` of them computes ``lm_head`` -> optional final logit soft-cap
``tanh(x / c) * c`` -> fp32 cross-entropy. Each chunk runs under ``torch.utils.checkpoint``, so only
one chunk's logits exist at a time, in the forward and again in the backward (recomputed).
Labels are unshifted (position t predicts label t + 1) and -100 is ignored, as in HF.
"""

from __future__ import annotations

from typing import Any

from streamtune.models import decoder, lm_head

IGNORE_INDEX = -100
# the batch key of :func:`loss_positions` (added by ``train.support.to_device``; not a model input)
LOSS_POSITIONS_KEY = "loss_positions"


def shift_labels(labels: Any) -> Any:
    """Labels aligned with the positions that predict them: ``labels[:, 1:]`` plus an ignored column."""
    import torch

    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def loss_positions(labels: Any) -> Any:
    """Flat indices of the positions of ``labels`` [B, T] (unshifted) that carry a loss, ascending.

    Problem: computed from labels on the GPU, ``nonzero`` makes the host wait for the GPU once per micro-batch
    (its output size is data-dependent), which drains the launch queue mid-step. Solution: the batch's CPU
    labels give the same indices before it moves (:func:`streamtune.train.support.to_device` adds them).
    """
    return (shift_labels(labels).reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def count_valid_tokens(labels: Any) -> int:
    """Positions that contribute to the loss of a batch of unshifted labels."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def batch_loss_tokens(batch: dict[str, Any]) -> int:
    """:func:`count_valid_tokens` of ``batch``, from its loss positions' length when it carries them (known on
    the host: counting labels already on a GPU waits for the GPU)."""
    positions = batch.get(LOSS_POSITIONS_KEY)
    return positions.numel() if positions is not None else count_valid_tokens(batch["labels"])


def _chunk_loss_sum(hidden: Any, targets: Any, head: Any, softcap: float | None) -> Any:
    import torch.nn.functional as F

    logits = head(hidden).float()
    if softcap is not None:
        logits = (logits / softcap).tanh() * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss_sum(hidden: Any, labels: Any, head: Any, softcap: float | None, chunk_tokens: int,
                        kernels: Any = None, positions: Any = None) -> Any:
    """Sum of the token cross-entropies of ``hidden`` [B, T, H] against unshifted ``labels`` [B, T].

    Args:
        hidden: final hidden states (after the decoder's final norm).
        labels: token ids, -100 where no loss is wanted.
        head: the output projection module.
        softcap: final logit soft-cap (Gemma), or None.
        chunk_tokens: positions per chunk; bounds the fp32 logits to ``chunk_tokens * vocab``.
        kernels: a :class:`~streamtune.kernels.KernelChoice`; with ``fused_linear_ce`` (and a head
            without bias) the chunks go through :func:`streamtune.kernels.linear_softcap_ce_sum`.
        positions: :func:`loss_positions` of ``labels`` on ``hidden``'s device, if known (saves a host sync).

    Returns:
        A 0-dim fp32 tensor (0 when no position has a label).
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    targets = shift_labels(labels).reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    index = positions if positions is not None else loss_positions(labels)
    total = hidden.new_zeros((), dtype=torch.float32)
    if index.numel() == 0:
        return total + 0.0 * hidden.sum()
    picked_hidden = flat_hidden.index_select(0, index)
    picked_targets = targets.index_select(0, index)
    if kernels is not None and kernels.fused_linear_ce and getattr(head, "bias", None) is None:
        from streamtune.kernels.linear_ce import linear_softcap_ce_sum

        return total + linear_softcap_ce_sum(picked_hidden, head.weight, picked_targets, softcap, chunk_tokens,
                                             compile_=kernels.compile_loss)
    for start in range(0, index.numel(), chunk_tokens):
        h = picked_hidden[start:start + chunk_tokens]
        t = picked_targets[start:start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h, t, head, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, t, head, softcap)
    return total


def final_hidden_states(model: Any, batch: dict[str, Any]) -> Any:
    """Run the (LoRA-wrapped) model's decoder on ``batch`` up to its final hidden states."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if batch.get(key) is not None:
            kwargs[key] = batch[key]
    return decoder(model)(**kwargs).last_hidden_state


def lm_loss_sum(model: Any, arch_adapter: Any, batch: dict[str, Any], chunk_tokens: int, kernels: Any = None) -> Any:
    """Summed next-token cross-entropy of ``model`` on ``batch`` (divide by the valid-token count).

    ``kernels`` (a :class:`~streamtune.kernels.KernelChoice`, None: stock) picks the loss kernel.

    Returns:
        A 0-dim fp32 tensor.
    """
    hidden = final_hidden_states(model, batch)
    softcap = arch_adapter.logit_softcap(_config(model))
    return chunked_lm_loss_sum(hidden, batch["labels"], lm_head(model), softcap, chunk_tokens, kernels,
                               batch.get(LOSS_POSITIONS_KEY))


def _config(model: Any) -> Any:
    from streamtune.models import unwrap

    return unwrap(model).config
