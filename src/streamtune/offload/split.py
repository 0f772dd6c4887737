"""Layer split: contiguous ranges of decoder layers computed on different devices of one process.

Problem: two unequal GPUs hold more of a model together than either alone, but data parallel makes each of
them stream every layer it cannot keep. Solution: device ``d`` computes decoder layers ``[b_d, b_{d+1})``
with its own :class:`~streamtune.offload.engine.StreamEngine` (its own resident/streamed layers, ring and
workspace); the packed host buffers of each range are packed once, by its engine, so host RAM still holds
one copy. Embeddings, final norm, LM head and loss stay on the head device (the first). A forward pre-hook
on every layer of a range after the first moves its inputs (hidden states, per-layer inputs, position
embeddings, attention masks incl. FlexAttention ``BlockMask`` objects, position ids, shared KV states) to the
range's device; a forward hook on the last decoder layer moves its output back to the head device. Copies
are autograd ops, so gradients cross back the same way. The GPUs work one after the other (no pipelining).
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from streamtune.offload.engine import StreamEngine


def _make_current(device: torch.device) -> None:
    """Kernels launched without a tensor's device guard (custom Triton kernels) run on the range's GPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _movable(value: Any) -> bool:
    """A non-tensor object that moves itself (FlexAttention ``BlockMask``, HF ``KVSharingDict``)."""
    return (not isinstance(value, (torch.Tensor, nn.Module, list, tuple, dict))
            and callable(getattr(value, "to", None)))


def move_closure(fn: Any, device: torch.device) -> Any:
    """``fn`` with every tensor it captured moved to ``device`` (nested functions and partials too).

    Problem: ``BlockMask.to`` moves the block tables but keeps its ``mask_mod``, whose closure holds the
    tensors transformers captured (packed-document ids, padding): FlexAttention on the second GPU then
    indexes a tensor on the first ("indices should be either on cpu or on the same device", measured
    on two H200s). Solution: rebuild the closure, cell by cell, with the tensors moved.
    """
    if isinstance(fn, functools.partial):
        return functools.partial(move_closure(fn.func, device), *(_moved_capture(a, device) for a in fn.args),
                                 **{k: _moved_capture(v, device) for k, v in fn.keywords.items()})
    if not isinstance(fn, types.FunctionType) or not fn.__closure__:
        return fn
    cells = []
    for cell in fn.__closure__:
        try:
            cells.append(types.CellType(_moved_capture(cell.cell_contents, device)))
        except ValueError:  # an empty cell (a name bound later in the enclosing scope)
            cells.append(types.CellType())
    moved = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    moved.__kwdefaults__ = fn.__kwdefaults__
    moved.__dict__.update(fn.__dict__)
    return moved


def _moved_capture(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (types.FunctionType, functools.partial)):
        return move_closure(value, device)
    if isinstance(value, (list, tuple)):
        return type(value)(_moved_capture(v, device) for v in value)
    return value


def _move_object(value: Any, device: torch.device) -> Any:
    moved = value.to(device)
    mask_mod = getattr(moved, "mask_mod", None)
    if mask_mod is not None and not isinstance(value, torch.Tensor):
        moved.mask_mod = move_closure(mask_mod, device)
    return moved


class DeviceMover:
    """Moves layer inputs to ``device``; inputs that need no grad are moved once per range pass (cached).

    Args:
        device: the range's compute device.
        first_index: the range's first decoder layer: its call starts a new pass (the cache is cleared).
    """

    def __init__(self, device: torch.device, first_index: int):
        self.device = device
        self.first_index = first_index
        self.cache: dict[int, tuple[Any, Any]] = {}

    def move(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) and not _movable(value):
            return value
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return value.to(self.device)
        hit = self.cache.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        moved = _move_object(value, self.device)
        # the cache keeps ``value`` alive, so its id cannot be reused by another object within the pass
        self.cache[id(value)] = (value, moved)
        return moved

    def pre_hook(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if index == self.first_index:
            self.cache.clear()
            _make_current(self.device)
        return tree_map(self.move, (args, kwargs), is_leaf=_movable)


class _LayerPreHook:
    """``register_forward_pre_hook(with_kwargs=True)`` callable of one layer (no closure)."""

    def __init__(self, mover: DeviceMover, index: int):
        self.mover = mover
        self.index = index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return self.mover.pre_hook(self.index, args, kwargs)


class _ToHead:
    """Forward hook of the last decoder layer: its output back to the head device."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        _make_current(self.device)
        return tree_map(lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t, output)


def move_outside_layers(model: nn.Module, layers: list[nn.Module], device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder layer to ``device``."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module._parameters.values():
            if param is not None and param.device != device:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def layer_ranges(num_layers: int, boundaries: list[int]) -> list[tuple[int, int]]:
    """``[(0, b1), (b1, b2), ..., (bn, num_layers)]``.

    Raises:
        ValueError: the boundaries are not strictly increasing within ``1..num_layers-1``.
    """
    edges = [0, *boundaries, num_layers]
    if any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"layer split {boundaries} must increase strictly within 1..{num_layers - 1}")
    return list(zip(edges, edges[1:]))


class SplitPlacement:
    """A model placed over several devices by :func:`place_split` (the interface of ``Placement``).

    Attributes:
        model: the placed model.
        device: the head device (embeddings, norm, LM head, loss; batches go here).
        devices: one compute device per range.
        engines: one engine per range.
        ranges: ``(start, stop)`` decoder layers per range.
        plan: the layer-split plan that chose the placement (None when given explicitly).
    """

    def __init__(self, model: Any, engines: list[StreamEngine], ranges: list[tuple[int, int]], hooks: list[Any],
                 plan: Any = None):
        self.model = model
        self.engines = engines
        self.ranges = ranges
        self.devices = [e.device for e in engines]
        self.device = self.devices[0]
        self.hooks = hooks
        self.plan = plan

    @property
    def engine(self) -> StreamEngine:
        """The head device's engine."""
        return self.engines[0]

    def step_metrics(self) -> dict[str, float]:
        """Transfer metrics since the last call, summed over the engines (h2d_gbps: bytes over summed copy time)."""
        parts = [e.step_metrics() for e in self.engines]
        out = {key: float(sum(p.get(key, 0.0) for p in parts)) for key in parts[0]}
        if "h2d_gbps" in out:
            seconds = out.get("h2d_s", 0.0)
            out["h2d_gbps"] = out.get("h2d_bytes", 0.0) / seconds / 1e9 if seconds > 0 else 0.0
        return out

    def describe(self) -> dict[str, Any]:
        per = [e.describe() for e in self.engines]
        return {
            "streamed_layers": [i for d in per for i in d["streamed_layers"]],
            "resident_layers": [i for d in per for i in d["resident_layers"]],
            "codec": per[0]["codec"], "host_bytes": sum(d["host_bytes"] for d in per),
            # every engine is built with the same memory.ring_slots and memory.prefetch
            "ring_slots": max(d["ring_slots"] for d in per), "prefetch": per[0]["prefetch"],
            "gpu_ring_bytes": sum(d["gpu_ring_bytes"] for d in per),
            "gpu_resident_bytes": sum(d["gpu_resident_bytes"] for d in per),
            "layer_split": [{"device": str(e.device), "layers": list(r), **d}
                            for e, r, d in zip(self.engines, self.ranges, per)],
        }

    def tensor_codecs(self) -> dict[str, str]:
        return {k: v for e in self.engines for k, v in e.tensor_codecs().items()}

    def close(self) -> None:
        """Remove the device hooks; decode every layer back into ordinary CPU tensors."""
        self._remove_hooks()
        for engine in self.engines:
            engine.close()

    def discard(self) -> None:
        """Remove the device hooks; free every engine's buffers without decoding the model back."""
        self._remove_hooks()
        for engine in self.engines:
            engine.discard()

    def _remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def place_split(model: Any, memory: Any, devices: list[Any], boundaries: list[int], streamed: list[list[int]],
                plan: Any = None, load_tensor: Any = None, pack_cache: Any = None) -> SplitPlacement:
    """Put a (LoRA-wrapped) CPU model over ``devices``: range ``d`` of decoder layers computes on ``devices[d]``.

    Args:
        model: stock HF causal LM, or a PEFT model wrapping one, on the CPU.
        memory: ``streamtune.config.MemoryConfig`` (codec, ring_slots, prefetch, gradient_checkpointing).
        devices: compute device per range; the first also holds embeddings, norm and LM head.
        boundaries: first decoder layer of every range after the first (``len(devices) - 1`` of them).
        streamed: streamed decoder layer indices (absolute) per range.
        plan: the layer-split plan (kept on the placement for reports).
        load_tensor: as :class:`StreamEngine`.
        pack_cache: as :class:`StreamEngine`.

    Raises:
        ValueError: boundaries or streamed indices that do not fit the model or the devices.
    """
    from streamtune.models.adapters import decoder_layers

    layers = decoder_layers(model)
    devices = [torch.device(d) for d in devices]
    if len(boundaries) != len(devices) - 1 or len(streamed) != len(devices):
        raise ValueError(f"{len(devices)} devices need {len(devices) - 1} boundaries and {len(devices)} streamed lists")
    ranges = layer_ranges(len(layers), list(boundaries))
    engines = [StreamEngine(model, device, list(chosen), codec=memory.codec, num_slots=memory.ring_slots,
                            prefetch=memory.prefetch, gradient_checkpointing=memory.gradient_checkpointing,
                            load_tensor=load_tensor, pack_cache=pack_cache, layer_range=span)
               for device, chosen, span in zip(devices, streamed, ranges)]
    devices = [e.device for e in engines]
    move_outside_layers(model, layers, devices[0])
    _make_current(devices[0])
    hooks = []
    for device, (start, stop) in list(zip(devices, ranges))[1:]:
        mover = DeviceMover(device, start)
        hooks += [layers[i].register_forward_pre_hook(_LayerPreHook(mover, i), with_kwargs=True)
                  for i in range(start, stop)]
    hooks.append(layers[-1].register_forward_hook(_ToHead(devices[0])))
    return SplitPlacement(model, engines, ranges, hooks, plan)
