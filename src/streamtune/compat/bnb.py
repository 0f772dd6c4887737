"""bitsandbytes entries: int8 layers under accelerate's offload hook, ``Int8Params`` quirks.

bitsandbytes is optional: it is imported inside functions, and every reproducer answers
"cannot test here" when it is missing.
"""

from __future__ import annotations

import copy
import functools
import gc
import inspect
import logging
import weakref
from typing import Any

from streamtune.compat.patches import PatchSet
from streamtune.compat.registry import Outcome

NO_BNB = "cannot test here: bitsandbytes not installed"
NO_ACCELERATE = "cannot test here: accelerate not installed"


def import_bnb() -> Any | None:
    """bitsandbytes, imported quietly, or None when it is not installed."""
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def _accelerate_hooks() -> Any | None:
    try:
        import accelerate.hooks
    except ImportError:
        return None
    return accelerate.hooks


def quantized_linear(in_features: int = 32, out_features: int = 16, seed: int = 0,
                     device: str = "cpu") -> tuple[Any, Any]:
    """A quantized ``Linear8bitLt`` on ``device`` and the float ``nn.Linear`` (CPU) it was made from."""
    import torch

    bnb = import_bnb()
    gen = torch.Generator().manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.1)
    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(dense.state_dict())
    return layer.to(device), dense


def offloaded_int8_linear(seed: int = 0, device: str = "cpu") -> Any:
    """A quantized ``Linear8bitLt`` behind accelerate's offload hook (execution device ``device``).

    Its weights live in the hook's ``weights_map`` and the module holds meta tensors between
    forwards, exactly as for a layer a ``device_map`` placed on ``"cpu"``.
    """
    import torch

    hooks = _accelerate_hooks()
    layer, _ = quantized_linear(seed=seed, device=device)
    weights = {name: tensor.detach().to("cpu").clone() for name, tensor in layer.state_dict().items()}
    hook = hooks.AlignDevicesHook(execution_device=torch.device(device), offload=True, weights_map=weights)
    hooks.add_hook_to_module(layer, hook)
    return layer


def reproduce_offloaded_int8_backward(device: str = "cpu") -> Outcome:
    """P1/P2/P9: backward of an offloaded int8 layer after the hook cleared ``state.SCB``.

    Passing also means the input gradient equals that of the same layer kept resident.
    """
    import torch

    if import_bnb() is None:
        return Outcome(None, NO_BNB)
    if _accelerate_hooks() is None:
        return Outcome(None, NO_ACCELERATE)
    layer = offloaded_int8_linear(device=device)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
    out = layer(x)
    scb_after = layer.state.SCB
    try:
        out.float().pow(2).sum().backward()
    except (AttributeError, TypeError, RuntimeError) as exc:
        return Outcome(True, f"int8 backward after accelerate's post_forward (state.SCB={scb_after}) "
                             f"raised {type(exc).__name__}: {exc}")
    resident, _ = quantized_linear(device=device)
    x_ref = x.detach().clone().requires_grad_(True)
    resident(x_ref).float().pow(2).sum().backward()
    if x.grad is None or not torch.allclose(x.grad, x_ref.grad, rtol=1e-3, atol=1e-5):
        return Outcome(True, "int8 backward through the offload hook ran but its input gradient differs "
                             "from the resident layer's")
    return Outcome(False, "int8 forward+backward through accelerate's offload hook ran; input gradient "
                          "equals the resident layer's")


def reproduce_int8_cb_kept() -> Outcome:
    """N3: after the offload hook's post_forward, ``state.CB`` still holds the int8 matrix."""
    import torch

    if import_bnb() is None:
        return Outcome(None, NO_BNB)
    if _accelerate_hooks() is None:
        return Outcome(None, NO_ACCELERATE)
    layer = offloaded_int8_linear()
    with torch.no_grad():
        layer(torch.randn(2, 32))
    weight_device = layer.weight.device
    kept = layer.state.CB
    if kept is not None and kept.device.type != "meta":
        num_bytes = kept.numel() * kept.element_size()
        return Outcome(True, f"weight back on {weight_device} but state.CB keeps {num_bytes} bytes "
                             f"of int8 matrix on {kept.device}: offloading frees nothing")
    return Outcome(False, f"after post_forward the weight is on {weight_device} and state.CB is released")


def reproduce_int8_ctx_activations() -> Outcome:
    """N4: int8 autograd keeps activations as ``ctx`` attributes, out of reach of checkpointing."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if import_bnb() is None:
        return Outcome(None, NO_BNB)
    int8_layer, dense = quantized_linear()
    dense.weight.requires_grad_(False)
    x = torch.randn(4, 32, requires_grad=True)
    survived = {}
    for name, layer in (("nn.Linear", dense), ("Linear8bitLt", int8_layer)):
        refs: list[Any] = []
        out = checkpoint(_scaled_then, layer, x, refs, use_reentrant=False)
        gc.collect()
        survived[name] = refs[0]() is not None
        out.float().sum().backward()
    if survived["nn.Linear"]:
        return Outcome(None, "checkpointing kept the activation of a plain nn.Linear too: test inconclusive")
    if survived["Linear8bitLt"]:
        return Outcome(True, "under non-reentrant checkpointing the activation fed to Linear8bitLt stays "
                             "alive until backward (kept on ctx, not via save_for_backward)")
    return Outcome(False, "non-reentrant checkpointing frees the activation fed to Linear8bitLt")


def _scaled_then(layer: Any, x: Any, refs: list) -> Any:
    hidden = x * 2.0
    refs.append(weakref.ref(hidden))
    return layer(hidden)


def reproduce_meta_scb() -> Outcome:
    """P3: reading ``SCB`` of an int8 weight on the meta device while materialising it."""
    import torch

    bnb = import_bnb()
    if bnb is None:
        return Outcome(None, NO_BNB)
    try:
        from accelerate import init_empty_weights
        from accelerate.utils import set_module_tensor_to_device
    except ImportError:
        return Outcome(None, NO_ACCELERATE)
    source, _ = quantized_linear()
    with init_empty_weights():
        layer = bnb.nn.Linear8bitLt(32, 16, bias=False, has_fp16_weights=False, threshold=0.0)
    try:
        getattr(layer.weight, "SCB", None)
        layer.state_dict()
        set_module_tensor_to_device(layer, "weight", torch.device("cpu"), value=source.weight.data,
                                    fp16_statistics=source.weight.SCB)
        layer(torch.randn(2, 32))
    except AttributeError as exc:
        return Outcome(True, f"meta int8 weight: AttributeError: {exc}")
    return Outcome(False, "a meta Linear8bitLt saved, materialised with its SCB and ran forward")


def reproduce_int8params_kwargs() -> Outcome:
    """P11: ``Int8Params.__new__`` must accept the extra keyword arguments transformers 5 passes."""
    import torch

    bnb = import_bnb()
    if bnb is None:
        return Outcome(None, NO_BNB)
    try:
        bnb.nn.Int8Params(torch.zeros(2, 2, dtype=torch.int8), requires_grad=False, _is_hf_initialized=True)
    except TypeError as exc:
        return Outcome(True, f"Int8Params(..., _is_hf_initialized=True) raised TypeError: {exc}")
    return Outcome(False, "Int8Params accepts extra keyword arguments")


def install_int8_offload_state(patch_set: PatchSet) -> None:
    """Fix for P1/P2/P9 and N3: give an offloaded int8 layer a fresh ``state`` after each forward.

    accelerate's ``post_forward`` clears ``module.state.SCB`` on the state object the autograd
    graph of that forward still reads. Handing the module a copy (CB/SCB released) before the
    hook runs leaves the graph's state intact, and the int8 matrix is then only held by the
    graph, so it is freed after backward (or at once under ``no_grad``).
    """
    hooks = _accelerate_hooks()
    if hooks is None:
        raise ImportError("accelerate is not installed")
    original = hooks.AlignDevicesHook.__dict__["post_forward"]
    patch_set.replace(hooks.AlignDevicesHook, "post_forward", _fresh_state_post_forward(original))


def _fresh_state_post_forward(original: Any) -> Any:
    @functools.wraps(original)
    def post_forward(self: Any, module: Any, output: Any) -> Any:
        return _post_forward_fresh_state(original, self, module, output)

    return post_forward


def _post_forward_fresh_state(original: Any, hook: Any, module: Any, output: Any) -> Any:
    if getattr(hook, "offload", False) and type(module).__name__ == "Linear8bitLt":
        fresh = copy.copy(module.state)
        fresh.CB = None
        fresh.SCB = None
        module.state = fresh
    return original(hook, module, output)


def install_int8params_kwargs(patch_set: PatchSet) -> None:
    """Fix for P11: drop keyword arguments ``Int8Params.__new__`` does not know."""
    bnb = import_bnb()
    if bnb is None:
        raise ImportError("bitsandbytes is not installed")
    cls = bnb.nn.Int8Params
    original = cls.__dict__["__new__"]
    new_func = original.__func__ if isinstance(original, staticmethod) else original
    accepted = set(inspect.signature(new_func).parameters)
    patch_set.replace(cls, "__new__", staticmethod(functools.partial(_new_known_kwargs, new_func, accepted)))


def _new_known_kwargs(new_func: Any, accepted: set, cls: Any, *args: Any, **kwargs: Any) -> Any:
    known = {key: value for key, value in kwargs.items() if key in accepted}
    return new_func(cls, *args, **known)
