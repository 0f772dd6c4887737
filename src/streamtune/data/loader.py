"""The training/eval batch streams with exact resume, and ``build_data`` (the public entry).

Everything is tokenized up front and held in RAM as flat int32 tensors (8 bytes per token for ids
and labels): fine for datasets up to a few hundred million tokens; larger corpora need streaming,
which this module does not do.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

from streamtune.data.formats import detect_format, encode, map_fields, validate_record
from streamtune.data.packing import TokenStore, collate, plan_rows
from streamtune.data.sources import Record, read_records
from streamtune.errors import InputError

HOLDOUT_SEED = 0x5EED
MAX_TRUNCATED_EXAMPLES = 3


@dataclass
class DataStats:
    """What the data amounts to, after tokenization and truncation (train split unless ``eval_``)."""

    format: str
    response_only: bool
    pack: bool
    seq_len: int
    num_samples: int
    num_tokens: int
    num_trained_tokens: int
    num_truncated: int
    rows_per_epoch: int
    batches_per_epoch: int
    packing_efficiency: float
    num_eval_samples: int = 0
    num_eval_tokens: int = 0
    num_eval_trained_tokens: int = 0
    num_eval_truncated: int = 0
    num_truncated_tokens: int = 0
    num_eval_truncated_tokens: int = 0
    truncated_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TokenBatches:
    """An endless, seeded stream of training batches over epochs, resumable exactly.

    Each epoch shuffles the samples (``torch.randperm`` seeded by ``(seed, epoch)``) when
    ``shuffle`` is set, packs them into rows, and the stream takes ``batch_size`` rows per batch,
    running on into the next epoch without a short batch. ``state_dict()`` is ``(epoch, position)``
    of the next row; a loader given it by ``load_state_dict`` yields the same batches as the
    uninterrupted one.

    Each batch also carries ``sample_indices``: per row, the indices (into the train split) of the
    samples packed into it; :meth:`where` names the dataset record of an index.
    """

    def __init__(self, store: TokenStore, seq_len: int, pack: bool, batch_size: int, seed: int,
                 shuffle: bool, pad_id: int, sources: list[str] | None = None):
        if batch_size < 1:
            raise InputError(f"train.batch_size: {batch_size} must be >= 1")
        self.store, self.seq_len, self.pack = store, seq_len, pack
        self.batch_size, self.seed, self.shuffle, self.pad_id = batch_size, seed, shuffle, pad_id
        self.sources = sources
        self.epoch, self.position = 0, 0
        self._rows_epoch = -1
        self._rows: list[list[int]] = []

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.store)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.store), generator=generator).tolist()

    def rows(self, epoch: int) -> list[list[int]]:
        """The rows (lists of sample indices) of ``epoch``."""
        if epoch != self._rows_epoch:
            self._rows = plan_rows(self.store, self._order(epoch), self.seq_len, self.pack)
            self._rows_epoch = epoch
        return self._rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        batch_rows = []
        while len(batch_rows) < self.batch_size:
            rows = self.rows(self.epoch)
            take = min(self.batch_size - len(batch_rows), len(rows) - self.position)
            batch_rows.extend(rows[self.position:self.position + take])
            self.position += take
            if self.position >= len(rows):
                self.epoch, self.position = self.epoch + 1, 0
        batch = collate(self.store, batch_rows, self.seq_len, self.pack, self.pad_id)
        batch["sample_indices"] = [list(row) for row in batch_rows]
        return batch

    def where(self, index: int) -> str:
        """The dataset record of sample ``index`` (``file:line`` or ``file:row N``), or ``sample N``."""
        if self.sources is None or not 0 <= index < len(self.sources):
            return f"sample {index}"
        return self.sources[index]

    def _fingerprint(self) -> dict[str, Any]:
        return {"num_samples": len(self.store), "num_tokens": self.store.num_tokens, "seq_len": self.seq_len,
                "pack": self.pack, "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle}

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position", ...}``: where the stream stands, plus what it was built from."""
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of an identically built loader.

        Raises:
            InputError: the data, seq_len, packing, batch size, shuffle or seed differ from the run
                that saved the state (resuming would not continue the same stream).
        """
        changed = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in self._fingerprint().items() if state.get(k) != v]
        if changed:
            raise InputError(
                "resume: the data stream differs from the checkpoint's (" + "; ".join(changed) +
                "); resume with the same data and data/train settings, or start a new run"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    @property
    def num_tokens(self) -> int:
        return self.store.num_tokens


class EvalBatches:
    """The evaluation split: ``eval_batches()`` (or iterating) yields one pass in file order."""

    def __init__(self, store: TokenStore, seq_len: int, pack: bool, batch_size: int, pad_id: int):
        self.store, self.seq_len, self.pack, self.batch_size, self.pad_id = store, seq_len, pack, batch_size, pad_id
        self.rows = plan_rows(store, range(len(store)), seq_len, pack)

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """A fresh pass over the eval split, same batches every call."""
        for start in range(0, len(self.rows), self.batch_size):
            yield collate(self.store, self.rows[start:start + self.batch_size], self.seq_len, self.pack, self.pad_id)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.eval_batches()

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    @property
    def num_tokens(self) -> int:
        return self.store.num_tokens


def _split(records: list[Record], eval_fraction: float) -> tuple[list[Record], list[Record]]:
    if eval_fraction <= 0:
        return records, []
    num_eval = max(1, round(eval_fraction * len(records)))
    if num_eval >= len(records):
        raise InputError(
            f"data.eval_fraction: {eval_fraction} of {len(records)} record(s) leaves none to train on; "
            f"lower it or add records"
        )
    held = set(random.Random(HOLDOUT_SEED).sample(range(len(records)), num_eval))
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def _tokenize(records: list[Record], fmt: str, tokenizer: Any, data_cfg: Any,
              response_only: bool) -> tuple[TokenStore, list[str]]:
    """The token store of ``records`` and where the first samples longer than ``data.seq_len`` came from."""
    samples = [encode(r, fmt, tokenizer, data_cfg.text_field, response_only) for r in records]
    too_long = [f"{r.where} ({len(ids)} tokens)" for r, (ids, _) in zip(records, samples) if len(ids) > data_cfg.seq_len]
    return TokenStore.from_samples(samples, data_cfg.seq_len), too_long[:MAX_TRUNCATED_EXAMPLES]


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _load_records(data_cfg: Any) -> tuple[str, list[Record], list[Record]]:
    fields = dict(getattr(data_cfg, "fields", None) or {})
    records = map_fields(read_records(data_cfg.path, "data.path"), fields, data_cfg.text_field)
    fmt = data_cfg.format if data_cfg.format != "auto" else detect_format(records[0], data_cfg.text_field)
    eval_records: list[Record] = []
    if data_cfg.eval_path:
        eval_records = map_fields(read_records(data_cfg.eval_path, "data.eval_path"), fields, data_cfg.text_field)
    elif data_cfg.eval_fraction:
        records, eval_records = _split(records, float(data_cfg.eval_fraction))
    for record in records + eval_records:
        validate_record(record, fmt, data_cfg.text_field)
    return fmt, records, eval_records


def build_data(data_cfg: Any, tokenizer: Any, batch_size: int, seed: int) -> tuple[TokenBatches, EvalBatches | None, DataStats]:
    """Read, validate and tokenize the data of a run; return its train and eval streams.

    Every record is validated before any tokenization, so a bad line fails fast.

    Args:
        data_cfg: ``RunConfig.data``.
        tokenizer: from :func:`streamtune.data.load_tokenizer`.
        batch_size: rows per batch (``train.batch_size``).
        seed: shuffling seed (``train.seed``).

    Returns:
        ``(train, eval_or_None, stats)``: ``train`` is an endless :class:`TokenBatches`; ``eval``
        is an :class:`EvalBatches` when ``data.eval_path`` or ``data.eval_fraction`` is set.

    Raises:
        InputError: missing/unreadable file, malformed record (file:line and field named),
            undetectable format, empty dataset, or no token that carries loss.
    """
    fmt, records, eval_records = _load_records(data_cfg)
    response_only = data_cfg.response_only if data_cfg.response_only is not None else fmt != "text"
    store, truncated_examples = _tokenize(records, fmt, tokenizer, data_cfg, response_only)
    if store.num_trained_tokens == 0:
        raise InputError(
            f"data.path: no token of {data_cfg.path!r} carries loss (responses empty or cut off by "
            f"data.seq_len={data_cfg.seq_len}); raise data.seq_len or set data.response_only: false"
        )
    pad_id = _pad_id(tokenizer)
    train = TokenBatches(store, data_cfg.seq_len, bool(data_cfg.pack), batch_size, seed, bool(data_cfg.shuffle), pad_id,
                         sources=[r.where for r in records])
    num_rows = len(train.rows(0))
    if num_rows < batch_size:
        raise InputError(
            f"data.path: {data_cfg.path!r} makes {num_rows} sequence(s) of up to data.seq_len={data_cfg.seq_len} "
            f"tokens ({len(store)} sample(s)), fewer than one batch of train.batch_size={batch_size}; add records "
            f"or lower train.batch_size to {num_rows}"
        )
    stats = DataStats(
        format=fmt, response_only=bool(response_only), pack=bool(data_cfg.pack), seq_len=data_cfg.seq_len,
        num_samples=len(store), num_tokens=store.num_tokens, num_trained_tokens=store.num_trained_tokens,
        num_truncated=store.num_truncated, rows_per_epoch=num_rows, batches_per_epoch=-(-num_rows // batch_size),
        packing_efficiency=store.num_tokens / (num_rows * data_cfg.seq_len),
        num_truncated_tokens=store.num_truncated_tokens, truncated_examples=truncated_examples,
    )
    evaluation = None
    if eval_records:
        eval_store, _ = _tokenize(eval_records, fmt, tokenizer, data_cfg, response_only)
        evaluation = EvalBatches(eval_store, data_cfg.seq_len, bool(data_cfg.pack), batch_size, pad_id)
        stats.num_eval_samples, stats.num_eval_tokens = len(eval_store), eval_store.num_tokens
        stats.num_eval_trained_tokens, stats.num_eval_truncated = eval_store.num_trained_tokens, eval_store.num_truncated
        stats.num_eval_truncated_tokens = eval_store.num_truncated_tokens
    return train, evaluation, stats
