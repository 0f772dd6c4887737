"""One ``torch.compile`` entry for every compiled piece of the fast path, with the Dynamo settings they need.

Problem 1: Dynamo treats every Python float argument of a ``dynamic=True`` compile as a runtime input
(``specialize_float`` is off by default): the norm ``eps``, the norm weight offset and the loss soft-cap each
became a 0-dim fp64 *CPU* tensor read back with ``.item()``, so Inductor generated and built C++ for the CPU
side of every variant (one per device, width and grad mode), and every call paid two extra host reads. On two
H200s the 26B layer split ran 9.5 minutes (7 after loading) without finishing a step, and stack dumps of a
12-layer cut of it and of its in-process test (tiny model) both found the main thread in
``cpu_vec_isa.check_build``, building C++ for the final RMSNorm. Solution: specialise floats; they are
constants of a model (a handful of values), so each is a guard, not an input.

Problem 2: Gemma4 calls one norm function with 2816-, 512- and 256-wide rows, forward and backward, on every
GPU of a layer split: the default limit of 8 compiled variants was hit on one H200, and every later call paid
the guard checks of all 8 before running eagerly. Solution: allow enough variants for every width of a model.

Problem 3: every compiled piece falls back to eager code on an exception (:class:`CompileFallback`, one per
piece), but non-reentrant checkpointing stops
a recompute by raising ``_StopRecomputationError`` from a saved-tensor hook, inside whichever compiled piece
saves the last tensor it needs: the fallback caught it, marked the piece broken and re-ran the piece, which the
checkpoint then refused ("target_frame.early_stop is set"; regional compile on the H200). Solution:
:func:`is_compile_failure` tells such control flow from a failure.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

RECOMPILE_LIMIT = 64


def configure_dynamo() -> None:
    """Apply the process-wide Dynamo settings above (idempotent; never lowers a limit the user raised)."""
    import torch

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.specialize_float = True


def compile_fn(fn: Callable[..., Any], dynamic: bool) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=dynamic)`` after :func:`configure_dynamo`."""
    import torch

    configure_dynamo()
    return torch.compile(fn, dynamic=dynamic)


def is_compile_failure(exc: BaseException) -> bool:
    """False for the exceptions torch raises through compiled code as control flow (checkpoint's early stop)
    and for running out of GPU memory (the eager form needs as much; the trainer reports it with the plan)."""
    import torch
    import torch.utils.checkpoint as checkpoint

    stop = getattr(checkpoint, "_StopRecomputationError", None)
    return not (isinstance(exc, torch.OutOfMemoryError) or (stop is not None and isinstance(exc, stop)))


class CompileFallback:
    """Run a piece compiled; on its first compile failure warn once and run its eager form from then on.

    One per compiled piece (fused norms, the experts' combine, decoder layers, FlexAttention, the wide-head
    attention's elementwise kernels). Inductor, Triton and C++ compiler errors have no common public base class,
    so any exception counts except those of :func:`is_compile_failure`.

    Args:
        what: the piece, as the warning names it ("fused norms/activations").
        then: what happens from now on, and how to silence it ("they run uncompiled (...)").
    """

    def __init__(self, what: str, then: str) -> None:
        self.what = what
        self.then = then
        self.failure: str | None = None

    @property
    def broken(self) -> bool:
        """The compiled form failed in this process; only the eager form runs."""
        return self.failure is not None

    def run(self, compiled: Callable[..., Any], eager: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``compiled(*args, **kwargs)``, or ``eager(...)`` once the compiled form has failed (then it warns).

        Raises:
            Exception: whatever ``compiled`` raises that is not a compile failure (:func:`is_compile_failure`).
        """
        if self.failure is None:
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:
                if not is_compile_failure(exc):
                    raise
                self.failure = f"{type(exc).__name__}: {str(exc)[:200]}"
                warnings.warn(f"streamtune: {self.what} could not be compiled here ({self.failure}); {self.then}",
                              RuntimeWarning, stacklevel=3)
        return eager(*args, **kwargs)

    def reset(self) -> None:
        """Try the compiled form again (kernels re-applied)."""
        self.failure = None
