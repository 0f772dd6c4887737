"""Training data: sources (JSONL, Parquet), formats (text, alpaca, messages), packing, batches.

Public API::

    tokenizer = load_tokenizer(cfg.model)
    train, evaluation, stats = build_data(cfg.data, tokenizer, cfg.train.batch_size, cfg.train.seed)
    batch = next(train)          # endless; train.state_dict() / train.load_state_dict(state)
    out = model(**batch)         # HF loss; labels are not shifted (the model shifts)
    for batch in evaluation.eval_batches(): ...   # when evaluation is not None

A batch is ``{"input_ids", "labels", "position_ids"}`` (int64 [B, T]), ``"attention_mask"`` (int64
[B, T], unpacked mode only) and ``"use_cache": False`` (a bool, not a tensor: move only tensors to
the device). Packed rows need ``use_cache=False`` and no attention mask for transformers to keep
samples from attending to each other (see :mod:`streamtune.data.packing`).
"""

from streamtune.data.loader import DataStats, EvalBatches, TokenBatches, build_data
from streamtune.data.tokenizer import build_tiny_tokenizer, load_tokenizer

__all__ = ["DataStats", "EvalBatches", "TokenBatches", "build_data", "build_tiny_tokenizer", "load_tokenizer"]
