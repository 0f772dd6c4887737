"""Loading local HF checkpoints shard by shard into the planned placement (one copy in host RAM).

Public API: :func:`open_checkpoint` (model with decoder layers still on disk + the engine's
``load_tensor`` hook), :func:`open_base` (the same for a checkpoint or a preset), :func:`load_checkpoint` (a plain CPU model), :class:`CheckpointReader`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CheckpointReader", "OpenedCheckpoint", "load_checkpoint", "open_base", "open_checkpoint"]


def __getattr__(name: str) -> Any:
    # lazy: ``import streamtune.loading`` stays free of torch
    if name == "CheckpointReader":
        from streamtune.loading.reader import CheckpointReader

        return CheckpointReader
    if name in ("OpenedCheckpoint", "load_checkpoint", "open_base", "open_checkpoint"):
        from streamtune.loading import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
