"""The streaming engine: frozen decoder-layer weights in (pinned) host RAM, streamed to the GPU.

Public entry point: :func:`place`, which puts a (LoRA-wrapped) model on its device according to
the run's ``memory`` config and returns a :class:`Placement` reporting per-step transfer metrics.
This package never imports transformers or peft; it sees modules and parameters only.
"""

from __future__ import annotations

from typing import Any

from streamtune.offload.engine import StreamEngine

__all__ = ["Placement", "StreamEngine", "place"]


class Placement:
    """Where the model lives after :func:`place`.

    Attributes:
        model: the placed model.
        device: its compute device.
        engine: the :class:`StreamEngine` serving streamed layers.
        plan: the plan that chose the placement (None when the placement was given explicitly).
    """

    def __init__(self, model: Any, device: Any, engine: StreamEngine, plan: Any = None):
        self.model = model
        self.device = device
        self.engine = engine
        self.plan = plan

    def step_metrics(self) -> dict[str, float]:
        """Transfer metrics since the last call: h2d_bytes, h2d_gbps, h2d_s, copy_wait_s."""
        return self.engine.step_metrics()

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    def tensor_codecs(self) -> dict[str, str]:
        """``{"layers.<i>.<param name>": codec name}`` for every packed frozen tensor."""
        return self.engine.tensor_codecs()

    def close(self) -> None:
        """Decode streamed layers back into ordinary CPU tensors and restore their forwards."""
        self.engine.close()

    def discard(self) -> None:
        """Free the engine's buffers without decoding the model back (it is unusable afterwards)."""
        self.engine.discard()


def streamed_layers(num_layers: int, memory: Any, device: Any, plan: Any = None) -> list[int]:
    """Decoder layers to stream for ``memory.stream``: all, none, or (auto) the plan's choice.

    Without a plan, ``auto`` streams nothing on a CPU and everything on a GPU.
    """
    if memory.stream == "none":
        return []
    if memory.stream == "all":
        return list(range(num_layers))
    if plan is not None:
        return list(plan.streamed_indices)
    return list(range(num_layers)) if str(device).startswith("cuda") else []


def place(model: Any, adapter: Any, memory: Any, device: Any, plan: Any = None, load_tensor: Any = None,
          pack_cache: Any = None, host_store: Any = None) -> Placement:
    """Put a (LoRA-wrapped) model on ``device`` according to ``memory`` (a MemoryConfig).

    Args:
        model: stock HF causal LM, or a PEFT model wrapping one, on the CPU.
        adapter: the model's ArchAdapter.
        memory: ``streamtune.config.MemoryConfig`` (stream, codec, ring_slots, prefetch,
            gradient_checkpointing).
        device: compute device.
        plan: optional ``streamtune.plan`` Plan whose ``streamed_indices`` decide ``stream: auto``.
        load_tensor: optional ``(index, name, param, out=None) -> None`` filling each frozen weight just before
            it is packed (see :class:`StreamEngine`).
        pack_cache: optional on-disk cache of packed layers (see :class:`StreamEngine`).
        host_store: optional shared host store of the local ranks (see :class:`StreamEngine`).

    Raises:
        ValueError: the plan names layers the model does not have.
    """
    from streamtune.models.adapters import decoder_layers

    num_layers = len(decoder_layers(model))
    streamed = streamed_layers(num_layers, memory, device, plan)
    engine = StreamEngine(model, device, streamed, codec=memory.codec, num_slots=memory.ring_slots,
                          prefetch=memory.prefetch, gradient_checkpointing=memory.gradient_checkpointing,
                          load_tensor=load_tensor, pack_cache=pack_cache, host_store=host_store)
    return Placement(model, engine.device, engine, plan)
