"""Small pieces of the training recipe: batches on the device, GPU memory readings, setup checks, reports."""

from __future__ import annotations

from typing import Any

from streamtune.errors import InputError


def due(step: int, every: int, max_steps: int, at_end: bool) -> bool:
    return (every > 0 and step % every == 0) or (at_end and step == max_steps)


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The batch's tensors on ``device``, plus the loss positions of its labels, computed before the move."""
    from streamtune.train.loss import LOSS_POSITIONS_KEY, loss_positions

    labels = batch.get("labels")
    if labels is not None and labels.device.type == "cpu" and LOSS_POSITIONS_KEY not in batch:
        batch = {**batch, LOSS_POSITIONS_KEY: loss_positions(labels)}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if hasattr(v, "to")}


def num_tokens(batch: dict[str, Any]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def check_cache_dir(cfg: Any) -> None:
    from streamtune.loading.cache import check_cache_root
    from streamtune.models import is_preset

    if not cfg.memory.cache_dir:
        return
    if is_preset(cfg.model.name):
        raise InputError(f"memory.cache_dir caches layers read from a checkpoint directory, but model.name is the "
                         f"preset {cfg.model.name!r} (built in memory, nothing to cache): remove memory.cache_dir")
    check_cache_root(cfg.memory.cache_dir)


def report_loading(load_stats: dict[str, float] | None, pack_cache: Any) -> None:
    """One stderr line: shard bytes read and their GB/s, pack-cache hits and their GB/s."""
    import sys

    if not load_stats:
        return
    line = f"weights: {load_stats['bytes_read'] / 1e9:.2f} GB read from the shards"
    if load_stats["read_s"] > 0:
        line += f" at {load_stats['gbps']:.2f} GB/s"
    if pack_cache is not None:
        stats = pack_cache.stats()
        line += (f"; pack cache {pack_cache.directory}: {stats['hits']} layer(s) read "
                 f"({stats['bytes_read'] / 1e9:.2f} GB at {stats['read_gbps']:.2f} GB/s), {stats['misses']} encoded and stored")
    print(line, file=sys.stderr)


def note(text: str | None) -> None:
    import sys

    if text:
        print(f"note: {text}", file=sys.stderr)


def check_vocab(model: Any, tokenizer: Any) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise InputError(
            f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab}; "
            "use the model's own tokenizer"
        )


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if hasattr(value, "__dict__"):
        return plain(vars(value))
    return str(value)


def reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_peak(device: Any) -> int:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
