"""Token storage, packing plans and batch assembly.

Packed rows hold whole samples back to back (a sample that does not fit starts the next row; the
tail is padding). ``position_ids`` restart at 0 at every sample, no ``attention_mask`` is given and
``use_cache`` is False: transformers' masking utilities then find the sample boundaries from the
position ids (``masking_utils.find_packed_sequence_indices``) and mask attention across samples,
for full and sliding-window layers, with sdpa and eager attention. They do so only without a KV
cache, and the stock models build one by default (``config.use_cache``), hence ``use_cache``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from streamtune.data.formats import IGNORE_INDEX

UNPACKED_LENGTH_MULTIPLE = 8


@dataclass
class TokenStore:
    """Tokenized samples, flat (int32) with offsets: ``ids[offsets[i]:offsets[i + 1]]`` is sample i."""

    ids: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    num_truncated: int
    num_truncated_tokens: int = 0

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[list[int], list[int]]], max_len: int) -> "TokenStore":
        """Store samples, truncating each to ``max_len`` tokens (counted in ``num_truncated``, the tokens
        cut in ``num_truncated_tokens``)."""
        lengths = [min(len(ids), max_len) for ids, _ in samples]
        offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        flat_ids = [t for (ids, _), n in zip(samples, lengths) for t in ids[:n]]
        flat_labels = [t for (_, labels), n in zip(samples, lengths) for t in labels[:n]]
        return cls(
            ids=torch.tensor(flat_ids, dtype=torch.int32),
            labels=torch.tensor(flat_labels, dtype=torch.int32),
            offsets=offsets,
            num_truncated=sum(len(ids) > max_len for ids, _ in samples),
            num_truncated_tokens=sum(max(0, len(ids) - max_len) for ids, _ in samples),
        )

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.ids[start:end], self.labels[start:end]

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def num_trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def plan_rows(store: TokenStore, order: Sequence[int], seq_len: int, pack: bool) -> list[list[int]]:
    """Group sample indices (in ``order``) into rows: greedy, order-preserving packing, or one per row."""
    if not pack:
        return [[int(i)] for i in order]
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        length = store.length(int(index))
        if current and used + length > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(int(index))
        used += length
    if current:
        rows.append(current)
    return rows


def _packed_row(store: TokenStore, row: list[int], seq_len: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    ids = torch.full((seq_len,), pad_id, dtype=torch.int64)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.int64)
    positions = torch.empty(seq_len, dtype=torch.int64)
    cursor = 0
    for index in row:
        sample_ids, sample_labels = store.sample(index)
        n = sample_ids.numel()
        ids[cursor:cursor + n] = sample_ids
        labels[cursor:cursor + n] = sample_labels
        # The token before this sample belongs to another one; HF shifts labels left, so this
        # label would train "last token of A -> first token of B".
        labels[cursor] = IGNORE_INDEX
        positions[cursor:cursor + n] = torch.arange(n)
        cursor += n
    # The padding tail is a segment of its own (positions restart), so no sample attends to it.
    positions[cursor:] = torch.arange(seq_len - cursor)
    return ids, labels, positions


def collate(store: TokenStore, rows: Sequence[list[int]], seq_len: int, pack: bool, pad_id: int) -> dict[str, Any]:
    """The batch dict of ``rows``: ``input_ids``, ``labels``, ``position_ids`` ([B, T] int64),
    ``attention_mask`` (unpacked only) and ``use_cache=False``.

    Packed: T = ``seq_len``. Unpacked: T = the longest sample of the batch rounded up to a multiple
    of 8 (at most ``seq_len``), padded right with ``pad_id`` and label -100.
    """
    if pack:
        parts = [_packed_row(store, row, seq_len, pad_id) for row in rows]
        ids, labels, positions = (torch.stack(p) for p in zip(*parts))
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}
    longest = max(store.length(row[0]) for row in rows)
    width = min(seq_len, -(-longest // UNPACKED_LENGTH_MULTIPLE) * UNPACKED_LENGTH_MULTIPLE)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for b, row in enumerate(rows):
        sample_ids, sample_labels = store.sample(row[0])
        n = sample_ids.numel()
        ids[b, :n], labels[b, :n], mask[b, :n] = sample_ids, sample_labels, 1
    positions = torch.arange(width, dtype=torch.int64).expand(len(rows), width).clone()
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask, "use_cache": False}
