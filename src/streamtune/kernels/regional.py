"""Regional ``torch.compile``: each decoder layer's forward through one compiled function.

The class forward (``type(layer).forward``) is compiled once per process and bound to every
decoder layer, with the layer as an argument: Dynamo inlines the module (its parameters and
buffers become graph inputs, not constants), so layers of the same class share compiled graphs
and recompile only where the code reads a value that differs between them (Gemma4: sliding vs
full attention layers, two graphs), not once per layer index. Dynamic shapes keep a new sequence
length from recompiling.

It composes with HF gradient checkpointing (the checkpoint stays outside the compiled forward:
transformers 5.1x checkpoints in ``__call__``; 5.2x wraps the class ``forward``, whose inner
function is compiled here and checkpointed as the wrapper would) and with the engine's streamed layers (:class:`streamtune.offload.checkpoint.
StreamedLayer` wraps the instance's compiled forward; parameters bound to slot views are graph
inputs, guarded by shape and dtype only). Imported lazily: it imports torch.
"""

from __future__ import annotations

import functools
import types
from typing import Any

from streamtune.kernels.binding import unbind_forwards
from streamtune.kernels.compiling import CompileFallback
from streamtune.kernels.counters import count

_STATE: dict[str, Any] = {"compiled": {}}
FALLBACK = CompileFallback("decoder layers", "they run eagerly (train.compile_layers=false silences this)")
_FLAG = "_streamtune_compiled_layer"
# what transformers' checkpointing wrapper drops from a checkpointed call (training runs keep no cache)
_CACHE_KWARGS = ("use_cache", "cache", "past_key_values", "layer_past")


def _inner_forward(cls: type) -> Any:
    """The class forward without transformers' checkpointing wrapper (5.2x wraps ``forward`` itself)."""
    return getattr(cls.forward, "__wrapped__", cls.forward)


def _compiled_forward(cls: type) -> Any:
    from streamtune.kernels.compiling import compile_fn

    table = _STATE["compiled"]
    if cls not in table:
        table[cls] = compile_fn(_inner_forward(cls), dynamic=True)
    return table[cls]


def _call_compiled(layer: Any, args: tuple, kwargs: dict) -> Any:
    """The compiled forward, under HF's checkpoint where the class forward would have checkpointed it."""
    import torch

    fn = _compiled_forward(type(layer))
    wrapped = _inner_forward(type(layer)) is not type(layer).forward
    if wrapped and getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        return layer._gradient_checkpointing_func(functools.partial(fn, layer, **kwargs), *args)
    return fn(layer, *args, **kwargs)


def compiled_layer_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The layer's class forward, compiled; on a compile failure warn once and run it eagerly from now on."""
    count("compiled_layer")
    return FALLBACK.run(_call_compiled, _eager_forward, self, args, kwargs)


def _eager_forward(layer: Any, args: tuple, kwargs: dict) -> Any:
    return type(layer).forward(layer, *args, **kwargs)


def compile_layers(layers: Any) -> int:
    """Bind :func:`compiled_layer_forward` to each decoder layer of ``layers``.

    Returns:
        The number of layers patched.

    Raises:
        RuntimeError: a layer already has a forward bound on the instance (the engine's ``StreamedLayer``, which
            binds the layer's weights before it runs the forward it wrapped): replacing it would run the layer
            on unbound placeholder weights. Compile the layers before they are placed.
    """
    for index, layer in enumerate(layers):  # all checked before any is patched
        if not getattr(layer, _FLAG, False) and "forward" in layer.__dict__:
            raise RuntimeError(f"decoder layer {index} already has a forward of its own "
                               f"({type(layer.__dict__['forward']).__name__}); compile the layers before the engine "
                               "places them (apply_kernels before StreamEngine)")
    patched = 0
    for layer in layers:
        if getattr(layer, _FLAG, False):
            continue
        layer.forward = types.MethodType(compiled_layer_forward, layer)
        setattr(layer, _FLAG, True)
        patched += 1
    return patched


def restore_layers(layers: Any) -> None:
    """Undo :func:`compile_layers`."""
    unbind_forwards(layers, _FLAG)
