"""Host side: one packed (pinned) buffer per streamed layer, and binding its tensors to GPU memory.

Problem: copying a layer tensor by tensor costs one small H2D copy each and pageable memory runs at
a ninth of pinned speed. Solution: every frozen tensor of a decoder layer is encoded with its codec
and written into one pinned uint8 buffer, parts at 256-byte aligned offsets; one copy moves the layer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ALIGN_BYTES = 256


def _align(offset_bytes: int) -> int:
    return (offset_bytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


@dataclass
class PackedPart:
    """One encoded part of a tensor inside a layer buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset_bytes: int
    nbytes: int


@dataclass
class PackedTensor:
    """A frozen parameter of the layer and where its encoded parts live in the buffer."""

    param: nn.Parameter
    name: str
    codec: Any
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: list[PackedPart]
    decoded_offset_bytes: int = 0

    @property
    def decoded_nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class LayerPack:
    """The packed host buffer of one streamed decoder layer.

    Attributes:
        index: decoder layer index.
        buffer: uint8 host tensor (pinned when CUDA is available) holding every encoded part.
        tensors: the layer's frozen parameters and their parts.
        decoded_nbytes: bytes of the decode workspace this layer needs (0 when every codec is identity).
    """

    index: int
    buffer: torch.Tensor
    tensors: list[PackedTensor] = field(default_factory=list)
    decoded_nbytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


def frozen_parameters(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters of ``layer`` that stream: every one that does not require grad (deduplicated)."""
    seen: set[int] = set()
    out = []
    for name, param in layer.named_parameters(remove_duplicate=False):
        if param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        out.append((name, param))
    return out


def pack_layer(index: int, layer: nn.Module, codec_for: Any, placeholder_device: torch.device,
               pin: bool, fill: Any = None, cache: Any = None, store: Any = None) -> LayerPack:
    """Encode the frozen parameters of ``layer`` into one host buffer and detach them from their storage.

    Each parameter's ``.data`` becomes a zero-byte placeholder of the right shape, dtype and device
    (an expanded scalar), so the original CPU storage is freed as soon as the caller drops its
    references: host RAM holds one (encoded) copy of the base weights, plus one layer in flight.

    Args:
        index: decoder layer index (for error messages and metrics).
        layer: the decoder layer (possibly wrapped by PEFT).
        codec_for: callable ``(param_name, shape) -> Codec`` (streamtune.quant codec objects).
        placeholder_device: where the placeholders live (the compute device).
        pin: allocate the buffer in page-locked memory.
        fill: optional ``(name, param, out=None, segment_numel=None, consume=None) -> None`` giving a
            placeholder parameter its real values just before it is encoded (a checkpoint reader):
            host RAM then holds one unpacked tensor at a time. An identity-codec tensor is read with
            ``out``, its place in the buffer, straight into it; other codecs pass ``consume``, which
            encodes each segment as soon as it is read (see ``CheckpointReader.load_tensor``).
        cache: optional pack cache (``streamtune.loading.cache.PackCache``): a layer it holds is
            read from it instead of filled and encoded; a layer it lacks is written to it.
        store: optional shared host store (``streamtune.distributed.shared_host``): it provides the
            buffer, already packed by another process (a hit) or to be packed and then published.
    """
    entries, nbytes, decoded_nbytes = layout_layer(layer, codec_for)
    signature = layout_signature(entries) if cache is not None or store is not None else ""
    if store is not None:
        buffer, hit = store.buffer(index, signature, nbytes, pin)
    else:
        buffer, hit = alloc_host_buffer(nbytes, pin), False
    hit = hit or (cache is not None and cache.read_into(index, signature, buffer))
    for entry in entries:
        if not hit:
            _fill_and_encode(entry, buffer, fill)
        entry.param.data = placeholder(entry.shape, entry.dtype, placeholder_device)
    if cache is not None and not hit:
        cache.write(index, signature, buffer)
    if store is not None and store.owner:
        store.publish(index, signature)
    return LayerPack(index, buffer, entries, decoded_nbytes)


def _fill_and_encode(entry: PackedTensor, buffer: torch.Tensor, fill: Any) -> None:
    """Give ``entry`` its values and write its encoded parts into ``buffer``.

    An identity-codec tensor is read by ``fill`` straight into its place in the buffer (no
    unpacked copy, no memcpy); other codecs encode the filled tensor straight into their parts.
    """
    views = {part.name: part_view(buffer, part) for part in entry.parts}
    unfilled = entry.param.data.untyped_storage().nbytes() < entry.decoded_nbytes  # still a placeholder
    if fill is not None and unfilled and entry.codec.is_identity:
        fill(entry.name, entry.param, out=views[entry.parts[0].name])
        return
    segment_numel = entry.codec.segment_numel(entry.shape)
    if fill is not None and unfilled and segment_numel is not None:
        # encode each segment as soon as it is read, while the reader threads fetch the next ones
        encode = functools.partial(_encode_segment, entry, views)
        fill(entry.name, entry.param, segment_numel=segment_numel, consume=encode)
        return
    if fill is not None:
        fill(entry.name, entry.param)
    entry.codec.encode(entry.param.data.detach().cpu(), out=views)


def _encode_segment(entry: PackedTensor, views: dict[str, torch.Tensor], start: int, stop: int) -> None:
    entry.codec.encode_segment(entry.param.data.detach().reshape(-1), start, stop, entry.shape, views)


def layout_layer(layer: nn.Module, codec_for: Any) -> tuple[list[PackedTensor], int, int]:
    """Where every frozen tensor's parts go: ``(entries, buffer bytes, decode workspace bytes)``."""
    entries = []
    offset = 0
    decoded_offset = 0
    for name, param in frozen_parameters(layer):
        shape = tuple(param.shape)
        codec = codec_for(name, shape)
        parts = []
        for spec in codec.layout(shape, param.dtype):
            offset = _align(offset)
            parts.append(PackedPart(spec.name, spec.dtype, tuple(spec.shape), offset, spec.nbytes))
            offset += spec.nbytes
        entry = PackedTensor(param, name, codec, shape, param.dtype, parts)
        if not codec.is_identity:
            decoded_offset = _align(decoded_offset)
            entry.decoded_offset_bytes = decoded_offset
            decoded_offset += entry.decoded_nbytes
        entries.append(entry)
    return entries, _align(offset), decoded_offset


def layout_signature(entries: list[PackedTensor]) -> str:
    """SHA-256 of a layer's layout: every tensor's name, shape, dtype, codec and part placement."""
    rows = [[e.name, list(e.shape), str(e.dtype), e.codec.name,
             [[p.name, str(p.dtype), list(p.shape), p.offset_bytes, p.nbytes] for p in e.parts]] for e in entries]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def alloc_host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host buffer of exactly ``nbytes``, page-locked when ``pin``.

    Problem: ``torch.empty(..., pin_memory=True)`` goes through the caching host allocator, which
    rounds every block up to a power of two: a 1.7 GB Gemma4 layer takes 2 GiB, 50 GB of layers
    take 60 GiB of a 64 GiB machine. Solution: allocate ordinary memory and page-lock exactly that
    with ``cudaHostRegister``; fall back to the caching allocator if registration is refused.
    The page-lock ends when the returned tensor object is collected: keep it, not only views of it.
    """
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if not pin or nbytes == 0:
        return buffer
    if _register(buffer):
        return buffer
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _register(buffer: torch.Tensor) -> bool:
    try:
        cudart = torch.cuda.cudart()
        ptr = buffer.data_ptr()
        if int(cudart.cudaHostRegister(ptr, buffer.numel(), 0)) != 0:
            return False
    except (AttributeError, RuntimeError, TypeError):  # no CUDA runtime binding: use the caching allocator
        return False
    if not buffer.is_pinned():
        cudart.cudaHostUnregister(ptr)
        return False
    # unlock the pages when the buffer goes away (before its memory is freed)
    weakref.finalize(buffer, cudart.cudaHostUnregister, ptr)
    return True


_PLACEHOLDER_SCALARS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` over one shared zero element: what an unbound streamed parameter holds.

    The zero is made once per dtype and device: a new one per unbind cost a fill kernel per tensor
    per layer pass (about 1,200 launches a step on the 26B preset).
    """
    key = (dtype, torch.device(device))
    scalar = _PLACEHOLDER_SCALARS.get(key)
    if scalar is None:
        scalar = _PLACEHOLDER_SCALARS[key] = torch.zeros((), dtype=dtype, device=device)
    return scalar.expand(shape)


def part_view(buffer: torch.Tensor, part: PackedPart) -> torch.Tensor:
    """The typed view of one part inside a uint8 buffer (host buffer or GPU slot)."""
    return buffer[part.offset_bytes:part.offset_bytes + part.nbytes].view(part.dtype).view(part.shape)


@dataclass
class BindViews:
    """What :func:`bind` needs for one layer in one buffer: each tensor's parts in the buffer and its decode output
    in the workspace (``entries``), and the one-launch decodes of its int8 and nf4 tensors where they apply
    (``batch``: ``streamtune.offload.batch_decode.LayerDecode`` objects)."""

    entries: list[tuple[PackedTensor, dict[str, torch.Tensor], torch.Tensor | None]]
    batch: list[Any] = field(default_factory=list)


def bind_views(pack: LayerPack, slot: torch.Tensor, workspace: torch.Tensor | None) -> BindViews:
    """The typed views :func:`bind` needs: each part in ``slot``, each decode output in ``workspace``.

    Host work only (about 200 us per 26B int8 layer on a CPU core; on CUDA one small table copy for the batched
    int8 and nf4 decodes), the same for every use of one slot by one layer: callers may keep them for as long as
    ``slot`` and ``workspace`` live.
    """
    from streamtune.offload.batch_decode import plan_layer_decode

    entries = []
    for entry in pack.tensors:
        parts = {p.name: part_view(slot, p) for p in entry.parts}
        out = None
        if not entry.codec.is_identity:
            start = entry.decoded_offset_bytes
            out = workspace[start:start + entry.decoded_nbytes].view(entry.dtype).view(entry.shape)
        entries.append((entry, parts, out))
    return BindViews(entries, plan_layer_decode(entries, slot, workspace))


def bind(pack: LayerPack, slot: torch.Tensor, workspace: torch.Tensor | None, views: BindViews | None = None) -> None:
    """Point the layer's parameters at their bytes in ``slot`` (decoding into ``workspace`` if needed).

    Runs on the compute stream: decode kernels are ordered after the wait on the slot's copy.
    ``views``: :func:`bind_views` of this slot and workspace, if kept.
    """
    from streamtune.offload.batch_decode import run_layer_decode

    views = views if views is not None else bind_views(pack, slot, workspace)
    decoded = run_layer_decode(views.batch, views.entries) if views.batch else set()
    for position, (entry, parts, out) in enumerate(views.entries):
        if out is None:
            entry.param.data = parts[entry.parts[0].name]
        elif position in decoded:
            entry.param.data = out
        else:
            entry.param.data = entry.codec.decode(parts, entry.shape, entry.dtype, out=out)


def unbind(pack: LayerPack, device: torch.device, placeholders: list[torch.Tensor] | None = None) -> None:
    """Return the layer's parameters to placeholders (``placeholders``: one per tensor, if kept); the slot may
    then be overwritten."""
    if placeholders is None:
        placeholders = [placeholder(entry.shape, entry.dtype, device) for entry in pack.tensors]
    for entry, value in zip(pack.tensors, placeholders):
        entry.param.data = value


def materialize(pack: LayerPack, device: torch.device, own: bool = False) -> torch.Tensor | None:
    """Bind the layer's parameters for good to decoded tensors on ``device`` (a resident layer).

    With an identity codec the parameters become views of one device copy of the packed buffer
    (on a CPU, of the host buffer itself: no copy at all). Otherwise every tensor gets its own
    decoded storage and the encoded device copy is dropped. ``own=True`` always gives each
    parameter its own storage (so the host buffer can be freed).

    Returns:
        The buffer the parameters view into, or None when each owns its storage.
    """
    source = pack.buffer if device.type == "cpu" else pack.buffer.to(device)
    shared = not own and all(entry.codec.is_identity for entry in pack.tensors)
    for entry in pack.tensors:
        parts = {p.name: part_view(source, p) for p in entry.parts}
        value = entry.codec.decode(parts, entry.shape, entry.dtype)
        if not shared and entry.codec.is_identity:
            value = value.clone()
        entry.param.data = value
    return source if shared else None
