"""Loss and perplexity of a model on a data file, with the training data pipeline and loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class EvalResult:
    """Mean token loss over a file (``loss``), ``perplexity = exp(loss)``, and what was counted."""

    loss: float
    perplexity: float
    loss_tokens: int
    num_batches: int


def eval_data_config(loaded: Any, path: str, fmt: str | None, seq_len: int | None) -> Any:
    """The run's data settings (format, seq_len, response_only, text_field, pack) for another file."""
    import dataclasses

    data = loaded.config.data
    run_data = loaded.source.run_config.get("data") or {}
    return dataclasses.replace(
        data, path=str(path), eval_path=None, eval_fraction=0.0, shuffle=False,
        format=fmt or run_data.get("format", "auto"),
        seq_len=int(seq_len or run_data.get("seq_len", data.seq_len)),
    )


def evaluate_file(loaded: Any, path: str, fmt: str | None = None, seq_len: int | None = None,
                  batch_size: int = 1, loss_chunk_tokens: int = 1024) -> EvalResult:
    """Mean next-token loss of ``loaded`` on every sample of ``path`` (one pass, file order).

    Args:
        loaded: an :class:`~streamtune.infer.session.InferenceModel`.
        path: a data file in any format ``streamtune train`` reads.
        fmt: record format (default: the run's ``data.format``, else auto).
        seq_len: tokens per sequence (default: the run's ``data.seq_len``).
        batch_size: sequences per forward.
        loss_chunk_tokens: tokens per chunk of the LM-head loss.

    Raises:
        InputError: the file is missing, malformed or carries no loss token.
    """
    import torch

    from streamtune.data import build_data
    from streamtune.data.loader import EvalBatches
    from streamtune.train.loss import batch_loss_tokens, lm_loss_sum
    from streamtune.train.support import to_device

    data_cfg = eval_data_config(loaded, path, fmt, seq_len)
    train, _, _ = build_data(data_cfg, loaded.tokenizer, batch_size, seed=0)
    batches = EvalBatches(train.store, data_cfg.seq_len, bool(data_cfg.pack), batch_size, train.pad_id)
    loaded.model.eval()
    loss_sum, loss_tokens, num_batches = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, loaded.device)
            loss_sum += float(lm_loss_sum(loaded.model, loaded.arch, batch, loss_chunk_tokens))
            loss_tokens += batch_loss_tokens(batch)
            num_batches += 1
    loss = loss_sum / max(1, loss_tokens)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), loss_tokens=loss_tokens, num_batches=num_batches)
