"""The streaming engine: packs streamed decoder layers into host buffers and serves them to compute.

Usage (what ``streamtune.offload.place`` does)::

    engine = StreamEngine(model, device, streamed=[0, 2, 4], codec="bf16", num_slots=2, prefetch=1)
    loss = ...; loss.backward()          # layers stream in forward and once more in backward
    engine.step_metrics()                # h2d_bytes, h2d_gbps, copy_wait_s since the last call
    engine.close()                       # weights back in ordinary tensors, forwards restored
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from streamtune.models.adapters import decoder_layers, unwrap
from streamtune.offload.checkpoint import StreamedLayer
from streamtune.offload.host import LayerPack, bind, pack_layer, unbind, unpack_to
from streamtune.offload.ring import SlotRing


def spread_evenly(num_layers: int, num_streamed: int) -> list[int]:
    """``num_streamed`` layer indices spread evenly over ``num_layers`` (resident compute between them)."""
    num_streamed = max(0, min(num_layers, num_streamed))
    if num_streamed == 0:
        return []
    step = num_layers / num_streamed
    return sorted({min(num_layers - 1, int(step * k + step / 2)) for k in range(num_streamed)})


def codec_chooser(codec_name: str) -> Any:
    """``(param_name, shape) -> Codec``: the run's codec where the per-tensor policy allows it, else bf16."""
    from streamtune.quant import get_codec, should_compress

    codec = get_codec(codec_name)
    identity = get_codec("bf16")

    def choose(name: str, shape: tuple[int, ...]) -> Any:
        return codec if should_compress(name, shape, codec_name) else identity

    return choose


class StreamEngine:
    """Streams the frozen weights of selected decoder layers from host RAM to ``device``.

    Everything else (embeddings, norms, LM head, resident layers, every LoRA weight, buffers) is
    moved to ``device`` once. Streamed layers run under the streamed checkpoint; resident layers
    use the model's own gradient checkpointing when ``gradient_checkpointing`` is set.

    Args:
        model: a stock HF causal LM or a PEFT model wrapping one, on the CPU.
        device: compute device (``cuda:N`` or ``cpu``; on a CPU copies are synchronous).
        streamed: decoder layer indices to stream.
        codec: storage codec of streamed frozen weights (``bf16``, ``int8``, ``nf4``).
        num_slots: GPU ring size.
        prefetch: layers copied ahead.
        gradient_checkpointing: checkpoint resident layers too.

    Raises:
        ValueError: a streamed index is out of range.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, streamed: list[int], codec: str = "bf16",
                 num_slots: int = 2, prefetch: int = 1, gradient_checkpointing: bool = True):
        self.model = model
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.layers = decoder_layers(model)
        bad = [i for i in streamed if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"streamed layer indices {bad} out of range 0..{len(self.layers) - 1}")
        self.streamed = sorted(set(streamed))
        self.codec = codec
        self.packs: dict[int, LayerPack] = {}
        self._original_forwards: dict[int, Any] = {}
        self._pack_layers(codec)
        model.to(self.device)
        self.ring = SlotRing(self.packs, self.device, num_slots, prefetch)
        self._configure_checkpointing(gradient_checkpointing)
        for index in self.streamed:
            layer = self.layers[index]
            self._original_forwards[index] = layer.forward
            layer.forward = StreamedLayer(self, index, layer.forward, self.device)

    def _pack_layers(self, codec: str) -> None:
        pin = torch.cuda.is_available() and self.device.type == "cuda"
        choose = codec_chooser(codec)
        for index in self.streamed:
            self.packs[index] = pack_layer(index, self.layers[index], choose, self.device, pin)

    def _configure_checkpointing(self, enabled: bool) -> None:
        base = unwrap(self.model)
        if enabled and getattr(base, "supports_gradient_checkpointing", False):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(base, "enable_input_require_grads"):
                base.enable_input_require_grads()
        for index in self.streamed:
            # the streamed checkpoint replaces the stock one on these layers
            if hasattr(self.layers[index], "gradient_checkpointing"):
                self.layers[index].gradient_checkpointing = False

    # -- called by StreamedLayer ----------------------------------------------------------------

    def acquire(self, index: int, phase: str, backward_expected: bool) -> None:
        """Bind layer ``index``'s parameters to its GPU bytes (copying them first if needed)."""
        slot = self.ring.acquire(index, phase, backward_expected)
        bind(self.packs[index], slot.buffer, self.ring.workspace)

    def release(self, index: int) -> None:
        """Unbind layer ``index``; its slot may be refilled once queued kernels finish."""
        unbind(self.packs[index], self.device)
        self.ring.release(index)

    # -- reporting and teardown -----------------------------------------------------------------

    @property
    def host_bytes(self) -> int:
        """Bytes of packed host buffers (the one copy of the streamed base weights)."""
        return sum(p.nbytes for p in self.packs.values())

    @property
    def gpu_ring_bytes(self) -> int:
        """Bytes of GPU slots plus the decode workspace."""
        workspace = self.ring.workspace.numel() if self.ring.workspace is not None else 0
        return self.ring.slot_nbytes * len(self.ring.slots) + workspace

    def step_metrics(self) -> dict[str, float]:
        """Transfer metrics since the last call: h2d_bytes, h2d_gbps, h2d_s, copy_wait_s."""
        return self.ring.pop_stats()

    def describe(self) -> dict[str, Any]:
        return {
            "streamed_layers": self.streamed,
            "resident_layers": [i for i in range(len(self.layers)) if i not in self.packs],
            "codec": self.codec,
            "ring_slots": len(self.ring.slots),
            "prefetch": self.ring.prefetch,
            "host_bytes": self.host_bytes,
            "gpu_ring_bytes": self.gpu_ring_bytes,
        }

    def close(self, device: torch.device | str | None = None) -> None:
        """Undo streaming: decode every streamed layer into ordinary tensors on ``device`` (default: CPU)."""
        target = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for index, pack in self.packs.items():
            unpack_to(pack, target)
            # drop the instance attribute: the class forward applies again
            del self.layers[index].forward
        self.packs.clear()
        self._original_forwards.clear()
