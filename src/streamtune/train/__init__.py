"""The training loop: LoRA, AdamW, warmup + cosine, accumulation, chunked loss, eval, checkpoints.

Public entry point: :func:`train` (``streamtune train CONFIG`` calls it).
"""

from streamtune.train.recipe import Recipe, TrainResult, train

__all__ = ["Recipe", "TrainResult", "train"]
