"""The streaming engine: frozen decoder-layer weights in pinned host RAM, streamed to the GPU.

Public entry point: :func:`place`. (Provisional resident-only implementation; the engine replaces it.)
"""

from __future__ import annotations

from typing import Any


class Placement:
    """Where the model lives after :func:`place`; reports transfer metrics per step."""

    def __init__(self, model: Any, device: Any):
        self.model = model
        self.device = device

    def step_metrics(self) -> dict[str, float]:
        """Transfer metrics since the last call: h2d_bytes, h2d_gbps, copy_wait_s."""
        return {"h2d_bytes": 0, "h2d_gbps": 0.0, "copy_wait_s": 0.0}

    def close(self) -> None:
        """Release pinned host memory and GPU slots."""


def place(model: Any, adapter: Any, memory: Any, device: Any) -> Placement:
    """Move a (LoRA-wrapped) model onto ``device`` according to ``memory`` (a MemoryConfig).

    Enables gradient checkpointing of decoder layers when ``memory.gradient_checkpointing``.
    """
    model.to(device)
    if memory.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
    return Placement(model, device)
