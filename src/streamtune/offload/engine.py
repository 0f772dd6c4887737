"""The streaming engine: packs every decoder layer into host buffers once and serves them to compute.

Usage (what ``streamtune.offload.place`` does)::

    engine = StreamEngine(model, device, streamed=[0, 2, 4], codec="bf16", num_slots=2, prefetch=1)
    loss = ...; loss.backward()          # layers stream in forward and once more in backward
    engine.step_metrics()                # h2d_bytes, h2d_gbps, copy_wait_s since the last call
    engine.close()                       # weights back in ordinary tensors, forwards restored
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from streamtune.models.adapters import decoder_layers, enable_activation_checkpointing, unwrap
from streamtune.offload.checkpoint import StreamedLayer
from streamtune.offload.host import LayerPack, bind, bind_views, materialize, pack_layer, placeholder, unbind
from streamtune.offload.ring import SlotRing


def codec_chooser(codec_name: str) -> Any:
    """``(param_name, shape) -> Codec``: the run's codec where the per-tensor policy allows it, else bf16."""
    from streamtune.quant import get_codec, should_compress

    codec = get_codec(codec_name)
    identity = get_codec("bf16")

    def choose(name: str, shape: tuple[int, ...]) -> Any:
        return codec if should_compress(name, shape, codec_name) else identity

    return choose


class StreamEngine:
    """Serves the frozen weights of every decoder layer from one packed host copy.

    Every decoder layer's frozen weights are packed once into host buffers (pinned on CUDA machines):
    host RAM holds the one copy of the base weights, in the codec. Streamed layers are copied into a
    GPU slot ring per use. Resident layers get their own GPU copy: bound for good when their codec is
    the identity (bf16), otherwise kept compressed and decoded per use into the one decode workspace
    that streamed layers share (so nf4 fits 4x more of the model on the GPU). Everything else
    (embeddings, norms, LM head, every LoRA weight, buffers) moves to ``device`` once. Streamed
    layers run under the streamed checkpoint; resident layers use the model's own gradient
    checkpointing when ``gradient_checkpointing`` is set. :meth:`set_streamed` re-places layers
    without repacking.

    Args:
        model: a stock HF causal LM or a PEFT model wrapping one, on the CPU.
        device: compute device (``cuda:N`` or ``cpu``; on a CPU copies are synchronous).
        streamed: decoder layer indices to stream.
        codec: storage codec of frozen layer weights (``bf16``, ``int8``, ``nf4``).
        num_slots: GPU ring size.
        prefetch: layers copied ahead.
        gradient_checkpointing: checkpoint resident layers too.
        load_tensor: optional ``(index, name, param, out=None) -> None`` called just before each
            frozen parameter is encoded, to give it its values (a checkpoint reader: host RAM then
            never holds more than one unpacked tensor); with ``out`` (bf16 layers) it reads straight
            into the packed buffer.
        pack_cache: optional ``streamtune.loading.cache.PackCache``: layers it holds are read from
            disk already packed (no ``load_tensor`` call, no encode); the others are written to it.
        host_store: optional shared host store (``streamtune.distributed.shared_host``): local
            ranks of one host pack into, or map, one shared copy of every layer buffer.
        layer_range: optional ``(start, stop)``: serve only decoder layers ``start..stop-1`` (a layer split,
            :mod:`streamtune.offload.split`): only they are packed and moved to ``device``; the rest of the
            model is left where it is. None: every layer, and the whole model moves to ``device``.

    Raises:
        ValueError: a streamed index is out of range, or ``layer_range`` is empty or out of range.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, streamed: list[int], codec: str = "bf16",
                 num_slots: int = 2, prefetch: int = 1, gradient_checkpointing: bool = True,
                 load_tensor: Any = None, pack_cache: Any = None, host_store: Any = None,
                 layer_range: tuple[int, int] | None = None):
        self.model = model
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.layers = decoder_layers(model)
        start, stop = layer_range if layer_range is not None else (0, len(self.layers))
        if not 0 <= start < stop <= len(self.layers):
            raise ValueError(f"layer_range {layer_range} is not a non-empty range within 0..{len(self.layers)}")
        self.layer_range = layer_range
        self.indices = range(start, stop)
        self.codec = codec
        self.num_slots = num_slots
        self.prefetch = prefetch
        self.gradient_checkpointing = gradient_checkpointing
        self.streamed: list[int] = []
        self.packs: dict[int, LayerPack] = {}
        self.resident_buffers: dict[int, torch.Tensor | None] = {}
        self.compressed_resident: set[int] = set()
        self.workspace: torch.Tensor | None = None
        # Problem: building every part's typed view (and every placeholder) again at each bind and unbind cost
        # about 0.27 ms of host time per layer pass (26B int8). Solution: keep them per (layer, slot buffer);
        # dropped whenever the ring or the workspace is rebuilt, so they never keep an old buffer alive.
        self._bind_views: dict[tuple[int, int], Any] = {}
        self._placeholders: dict[int, list[torch.Tensor]] = {}
        self._check_indices(streamed)
        self._pack_layers(codec, load_tensor, pack_cache, host_store)
        if layer_range is None:
            model.to(self.device)
        else:
            for index in self.indices:
                self.layers[index].to(self.device)
        if start == 0:
            self._configure_checkpointing(gradient_checkpointing)
        self.ring = SlotRing({}, self.device, num_slots, prefetch)
        self.set_streamed(streamed)

    def _check_indices(self, streamed: list[int]) -> None:
        bad = [i for i in streamed if i not in self.indices]
        if bad:
            raise ValueError(f"streamed layer indices {bad} out of range {self.indices.start}..{self.indices.stop - 1}")

    def _pack_layers(self, codec: str, load_tensor: Any, pack_cache: Any, host_store: Any = None) -> None:
        pin = torch.cuda.is_available() and self.device.type == "cuda"
        choose = codec_chooser(codec)
        for index in self.indices:
            fill = functools.partial(load_tensor, index) if load_tensor is not None else None
            self.packs[index] = pack_layer(index, self.layers[index], choose, self.device, pin, fill, pack_cache,
                                           host_store)

    def _configure_checkpointing(self, enabled: bool) -> None:
        base = unwrap(self.model)
        if enabled and getattr(base, "supports_gradient_checkpointing", False):
            enable_activation_checkpointing(base)
            if hasattr(base, "enable_input_require_grads"):
                base.enable_input_require_grads()

    def set_streamed(self, streamed: list[int]) -> None:
        """Stream exactly ``streamed``; every other decoder layer becomes resident.

        Raises:
            ValueError: an index is out of range.
        """
        self._check_indices(streamed)
        new = sorted(set(streamed))
        # Free the old ring and workspace before anything new is allocated: both at once would
        # exceed a budget that each alone fits.
        self.ring = SlotRing({}, self.device, self.num_slots, self.prefetch)
        self.workspace = None
        self._bind_views.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        for index in self.indices:
            if index in new and index not in self.streamed:
                self._make_streamed(index)
            elif index not in new and (index in self.streamed or index not in self.resident_buffers):
                self._make_resident(index)
        self.streamed = new
        # Slots are sized for the largest streamed layer: a new ring, empty.
        self.ring = SlotRing({i: self.packs[i] for i in new}, self.device, self.num_slots, self.prefetch)
        decoded = [self.packs[i].decoded_nbytes for i in [*new, *self.compressed_resident]]
        if max(decoded, default=0):
            # one workspace serves every decode: a single layer is bound at any time
            self.workspace = torch.empty(max(decoded), dtype=torch.uint8, device=self.device)

    def _make_resident(self, index: int) -> None:
        layer = self.layers[index]
        pack = self.packs[index]
        _unwrap_forward(layer)
        if pack.decoded_nbytes and self.device.type == "cuda":
            # compressed on the GPU, decoded per use like a streamed layer, without the copy
            unbind(pack, self.device)
            self.resident_buffers[index] = pack.buffer.to(self.device)
            self.compressed_resident.add(index)
            self._wrap(index)
            return
        self.compressed_resident.discard(index)
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = self.gradient_checkpointing
        self.resident_buffers[index] = materialize(pack, self.device)

    def _make_streamed(self, index: int) -> None:
        unbind(self.packs[index], self.device)
        self.resident_buffers.pop(index, None)
        self.compressed_resident.discard(index)
        self._wrap(index)

    def _wrap(self, index: int) -> None:
        layer = self.layers[index]
        if hasattr(layer, "gradient_checkpointing"):
            # the streamed checkpoint replaces the stock one on this layer
            layer.gradient_checkpointing = False
        # a forward bound on the instance (kernels.regional's compiled one) is the math the slot serves
        inner = layer.__dict__.get("forward")
        if isinstance(inner, StreamedLayer):
            inner = inner.forward
        if inner is None:
            inner = type(layer).forward.__get__(layer)
        layer.forward = StreamedLayer(self, index, inner, self.device)

    # -- called by StreamedLayer ----------------------------------------------------------------

    def acquire(self, index: int, phase: str, backward_expected: bool) -> None:
        """Bind layer ``index``'s parameters to its GPU bytes (copying them first if needed)."""
        if index in self.compressed_resident:
            buffer = self.resident_buffers[index]
        else:
            buffer = self.ring.acquire(index, phase, backward_expected).buffer
        key = (index, buffer.data_ptr())
        views = self._bind_views.get(key)
        if views is None:
            views = self._bind_views[key] = bind_views(self.packs[index], buffer, self.workspace)
        bind(self.packs[index], buffer, self.workspace, views)

    def release(self, index: int) -> None:
        """Unbind layer ``index``; its slot may be refilled once queued kernels finish."""
        pack = self.packs[index]
        if index not in self._placeholders:
            self._placeholders[index] = [placeholder(e.shape, e.dtype, self.device) for e in pack.tensors]
        unbind(pack, self.device, self._placeholders[index])
        if index not in self.compressed_resident:
            self.ring.release(index)

    # -- reporting and teardown -----------------------------------------------------------------

    @property
    def host_bytes(self) -> int:
        """Bytes of packed host buffers (the one copy of the decoder layers' base weights)."""
        return sum(p.nbytes for p in self.packs.values())

    @property
    def gpu_ring_bytes(self) -> int:
        """Bytes of GPU slots plus the decode workspace."""
        workspace = self.workspace.numel() if self.workspace is not None else 0
        return self.ring.slot_nbytes * len(self.ring.slots) + workspace

    @property
    def gpu_resident_bytes(self) -> int:
        """Bytes of the resident layers' frozen weights on the device (compressed ones in their codec)."""
        if self.device.type == "cpu":
            return 0
        return sum(self.packs[i].nbytes if i in self.compressed_resident
                   else sum(entry.decoded_nbytes for entry in self.packs[i].tensors) for i in self.resident_buffers)

    def step_metrics(self) -> dict[str, float]:
        """Transfer metrics since the last call: h2d_bytes, h2d_copies, h2d_s, h2d_gbps, copy_wait_s."""
        return self.ring.pop_stats()

    def describe(self) -> dict[str, Any]:
        return {
            "streamed_layers": self.streamed,
            "resident_layers": sorted(self.resident_buffers),
            "codec": self.codec,
            "ring_slots": len(self.ring.slots),
            "prefetch": self.ring.prefetch,
            "host_bytes": self.host_bytes,
            "gpu_ring_bytes": self.gpu_ring_bytes,
            "gpu_resident_bytes": self.gpu_resident_bytes,
        }

    def tensor_codecs(self) -> dict[str, str]:
        """``{"layers.<i>.<param name>": codec name}`` for every packed frozen tensor."""
        return {f"layers.{index}.{entry.name}": entry.codec.name
                for index, pack in sorted(self.packs.items()) for entry in pack.tensors}

    def discard(self) -> None:
        """Drop the packed layers, the ring and the resident copies without decoding anything back.

        Problem: :meth:`close` decodes every layer into ordinary CPU tensors, the whole bf16 model in host RAM
        (about 50 GB for the 26B preset, next to the packed copy while it runs) and half a minute, which a
        process that exits after training never uses. Solution: this; the model's layers are left unusable.
        """
        self._stop_streaming()
        self._forget_layers()

    def close(self, device: torch.device | str | None = None) -> None:
        """Undo the engine: decode every layer into ordinary tensors on ``device`` (default: CPU)."""
        target = torch.device(device) if device is not None else torch.device("cpu")
        self._stop_streaming()
        for index, pack in self.packs.items():
            layer = self.layers[index]
            _unwrap_forward(layer)
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = self.gradient_checkpointing
            materialize(pack, target, own=True)
        self._forget_layers()

    def _stop_streaming(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy or kernel may still read a buffer dropped here
        self.ring = SlotRing({}, self.device, self.num_slots, self.prefetch)
        self._bind_views.clear()

    def _forget_layers(self) -> None:
        self._placeholders.clear()
        self.packs.clear()
        self.resident_buffers.clear()
        self.compressed_resident.clear()
        self.workspace = None
        self.streamed = []


def _unwrap_forward(layer: torch.nn.Module) -> None:
    """Drop the engine's :class:`StreamedLayer` from ``layer``; a forward bound before placement stays.

    Problem: deleting the instance ``forward`` also deleted the compiled forward that ``train.compile_layers``
    binds before placement, so resident layers silently ran eagerly. Solution: put back what the wrapper wrapped,
    unless that is the class forward (then the attribute goes and the class forward applies again).
    """
    wrapper = layer.__dict__.get("forward")
    if not isinstance(wrapper, StreamedLayer):
        return
    if getattr(wrapper.forward, "__func__", None) is type(layer).forward:
        del layer.forward
    else:
        layer.forward = wrapper.forward
