"""The streamed checkpoint: a decoder layer whose weights exist on the GPU only while it computes.

Problem: stock gradient checkpointing keeps a layer's weights alive from its forward to its backward
(autograd saves them), and accelerate-style hooks fetch a layer twice in the backward (once for the
recompute, once more because the hook unloaded it in between). Solution: an autograd Function that
runs the layer's forward without autograd, saves only its inputs, and in the backward fetches the
layer once, recomputes it with autograd and back-propagates immediately, then releases the slot.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from streamtune.offload.ring import BACKWARD, FORWARD


class _RngState:
    """CPU and device RNG states, so a recompute draws the same dropout masks as the forward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class _StreamedLayerFunction(torch.autograd.Function):
    """forward(ctx, layer, spec, dummy, *leaves): the differentiable leaves are tensors that need grad."""

    @staticmethod
    def forward(ctx: Any, layer: "StreamedLayer", call: "_Call", dummy: torch.Tensor, *grad_leaves: torch.Tensor):
        ctx.layer = layer
        ctx.call = call
        ctx.rng = _RngState(layer.device)
        ctx.save_for_backward(*grad_leaves)
        output = layer.run(call.rebuild(grad_leaves), FORWARD, backward_expected=True)
        return call.flatten_output(output)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor):
        leaves = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.random.fork_rng(devices=[ctx.layer.device] if ctx.layer.device.type == "cuda" else []):
            ctx.rng.restore()
            with torch.enable_grad():
                ctx.layer.run(ctx.call.rebuild(leaves), BACKWARD, backward_expected=True,
                              then=functools.partial(_backward_through, grad_outputs=grad_outputs))
        return (None, None, None, *[leaf.grad for leaf in leaves])


def _backward_through(output: Any, grad_outputs: tuple[torch.Tensor, ...]) -> None:
    tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    pairs = [(t, g) for t, g in zip(tensors, grad_outputs) if g is not None and t.requires_grad]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


class _Call:
    """The arguments of one layer call, with the tensors that need grad pulled out as leaves."""

    def __init__(self, args: tuple, kwargs: dict):
        flat, self.spec = tree_flatten((args, kwargs))
        self.flat = flat
        self.grad_positions = [i for i, x in enumerate(flat)
                               if isinstance(x, torch.Tensor) and x.requires_grad]

    def grad_leaves(self) -> list[torch.Tensor]:
        return [self.flat[i] for i in self.grad_positions]

    def flatten_output(self, output: Any) -> tuple[torch.Tensor, ...]:
        """The output's tensors, remembering the structure and non-tensor values for :meth:`unflatten_output`."""
        flat, self.out_spec = tree_flatten(output)
        self.out_constants = [None if isinstance(t, torch.Tensor) else t for t in flat]
        return tuple(t for t in flat if isinstance(t, torch.Tensor))

    def unflatten_output(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        it = iter(tensors)
        flat = [next(it) if constant is None else constant for constant in self.out_constants]
        return tree_unflatten(flat, self.out_spec)

    def rebuild(self, leaves: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> tuple[tuple, dict]:
        flat = list(self.flat)
        for i, leaf in zip(self.grad_positions, leaves):
            flat[i] = leaf
        return tree_unflatten(flat, self.spec)


class StreamedLayer:
    """Replaces a streamed decoder layer's ``forward`` (instance attribute; module names unchanged).

    Args:
        engine: the owning engine (``acquire``/``release`` of layer weights).
        index: decoder layer index.
        forward: the layer's original bound ``forward``.
        device: compute device.
    """

    def __init__(self, engine: Any, index: int, forward: Callable, device: torch.device):
        self.engine = engine
        self.index = index
        self.forward = forward
        self.device = device
        self.dummy = torch.empty(0, requires_grad=True)

    def run(self, call: tuple[tuple, dict], phase: str, backward_expected: bool,
            then: Callable[[Any], None] | None = None) -> Any:
        """Run the original forward with the weights bound; ``then`` runs before the release."""
        args, kwargs = call
        self.engine.acquire(self.index, phase, backward_expected)
        try:
            output = self.forward(*args, **kwargs)
            if then is not None:
                then(output)
        finally:
            self.engine.release(self.index)
        return output

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = _Call(args, kwargs)
        if not torch.is_grad_enabled():
            return self.run((args, kwargs), FORWARD, backward_expected=False)
        outputs = _StreamedLayerFunction.apply(self, call, self.dummy, *call.grad_leaves())
        return call.unflatten_output(outputs)

