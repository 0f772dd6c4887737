"""A second device on a CPU-only machine: PyTorch's Lazy Tensor backend (``lazy:0``).

Like CUDA, ``lazy`` refuses to mix with non-scalar CPU tensors, so device mismatches under a
``device_map`` offload (P4-P7) show up without a GPU. A few shims carry a Gemma4 step on it;
they are installed only inside ``lazy_shims()`` and removed on exit.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Any, Iterator

from streamtune.compat.patches import PatchSet
from streamtune.compat.registry import Outcome

LAZY = "lazy:0"
DEVICE_IDS = ("P4", "P5", "P6", "P7")
# Where in the traceback each published device bug would surface (function or source text).
_SIGNATURES = {
    "P4": ("apply_rotary_pos_emb", "rotate_half", "rotary_emb", "cos", "sin"),
    "P5": ("position_ids", "mask", "cache_position"),
    "P6": ("scaled_dot_product_attention", "sdpa_attention_forward"),
    "P7": ("layer_scalar",),
}


_BACKEND: dict[str, str | None] = {}


def lazy_available() -> str | None:
    """None when the lazy backend runs (starting it once per process); otherwise why it cannot."""
    if "state" in _BACKEND:
        return _BACKEND["state"]
    import torch

    try:
        torch.empty(1, device=LAZY)  # already started by someone else
        _BACKEND["state"] = None
        return None
    except Exception:
        pass
    try:
        import torch._lazy.ts_backend

        torch._lazy.ts_backend.init()
        torch.empty(1, device=LAZY)
        _BACKEND["state"] = None
    except Exception as exc:  # a build without the TorchScript lazy backend
        _BACKEND["state"] = f"PyTorch lazy backend unavailable: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return _BACKEND["state"]


def _chunk(original: Any) -> Any:
    def chunk(self: Any, chunks: int, dim: int = 0) -> Any:
        if self.device.type != "lazy":
            return original(self, chunks, dim)
        size = self.shape[dim]
        step = -(-size // chunks)
        return tuple(self.narrow(dim, start, min(step, size - start)) for start in range(0, size, step))

    return chunk


def _split(original: Any) -> Any:
    def split(self: Any, split_size: Any, dim: int = 0) -> Any:
        if self.device.type != "lazy":
            return original(self, split_size, dim)
        size = self.shape[dim]
        sizes = [split_size] * -(-size // split_size) if isinstance(split_size, int) else list(split_size)
        pieces, start = [], 0
        for length in sizes:
            length = min(length, size - start)
            pieces.append(self.narrow(dim, start, length))
            start += length
        return tuple(pieces)

    return split


def _data_ptr(original: Any) -> Any:
    # Lazy tensors all report 0, which merges every parameter in accelerate's tied-weight map.
    def data_ptr(self: Any) -> int:
        return id(self) if self.device.type == "lazy" else original(self)

    return data_ptr


def _autocast_enabled(original: Any) -> Any:
    def is_autocast_enabled(*args: Any) -> bool:
        if args and args[0] == "lazy":
            return False
        return original(*args)

    return is_autocast_enabled


@contextlib.contextmanager
def lazy_shims() -> Iterator[None]:
    """Install the shims the lazy device needs for a Gemma4 step; restore everything on exit."""
    import torch

    shims = [(torch.Tensor, "chunk", _chunk), (torch.Tensor, "split", _split),
             (torch.Tensor, "data_ptr", _data_ptr), (torch, "is_autocast_enabled", _autocast_enabled)]
    patch_set = PatchSet("lazy-shims")
    try:
        for owner, name, factory in shims:
            patch_set.replace(owner, name, factory(getattr(owner, name)))
        yield
    finally:
        patch_set.revert()


def classify(exc: BaseException) -> str | None:
    """The published id (P4-P7) whose code path raised ``exc``, or None."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "transformers" not in frame.filename:
            continue
        text = f"{frame.name} {frame.line or ''}"
        for fix_id in ("P6", "P4", "P7", "P5"):
            if any(sign in text for sign in _SIGNATURES[fix_id]):
                return fix_id
    return None


_CACHE: dict[str, Any] = {}


def device_map_step() -> tuple[str, Any]:
    """One forward+backward of a tiny Gemma4 with layers offloaded to the CPU and ``lazy:0`` as the GPU.

    Returns:
        ("ok", loss) or ("error", exception) or ("unavailable", reason).
    """
    problem = lazy_available()
    if problem:
        return "unavailable", problem
    import torch
    from accelerate import dispatch_model

    from streamtune.compat.offload_lora import offload_device_map, tiny_model

    with lazy_shims():
        model = tiny_model()
        model = dispatch_model(model, device_map=offload_device_map(model, LAZY), main_device=LAZY)
        ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
        try:
            loss = model(input_ids=ids.to(LAZY), labels=ids.to(LAZY)).loss
            loss.backward()
            return "ok", float(loss.detach().cpu())
        except RuntimeError as exc:
            return "error", exc


def reproduce_device(entry_id: str) -> Outcome:
    """P4-P7: does a ``device_map`` CPU offload step hit a device mismatch in this entry's code path?

    The four entries share one step, cached until ``clear_cache()`` (``compat.check`` clears it).
    """
    if "step" not in _CACHE:
        _CACHE["step"] = device_map_step()
    status, value = _CACHE["step"]
    if status == "unavailable":
        return Outcome(None, f"cannot test here: no second device ({value}); needs CUDA")
    if status == "ok":
        return Outcome(False, f"tiny Gemma4, layers 1-2 offloaded to CPU, {LAZY} as execution device: "
                              f"forward+backward ran without a device mismatch (loss {value:.3f})")
    culprit = classify(value)
    message = str(value).splitlines()[0]
    if culprit == entry_id:
        return Outcome(True, f"device mismatch in this code path: {message}")
    if culprit is None:
        return Outcome(None, f"the offload step failed elsewhere: {message}")
    return Outcome(None, f"not reached: the step stopped at {culprit}'s code path first ({message})")


def clear_cache() -> None:
    _CACHE.clear()
