"""The fast path's compile settings: floats are constants of the graph (no CPU scalar inputs), a new value
recompiles instead of reusing a graph, and enough variants are allowed for a model's widths."""

from __future__ import annotations

import pytest
import torch

from streamtune.kernels import compiling
from streamtune.kernels.fused import rms_norm_scaled


class _Recorder:
    """A Dynamo backend that keeps every graph it is given and runs it eagerly."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm)
        return gm.forward


def _placeholder_values(gm: torch.fx.GraphModule) -> list:
    return [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]


@pytest.fixture(autouse=True)
def _dynamo_config():
    """Each test sees, and leaves, the process's Dynamo settings as they were."""
    config = torch._dynamo.config
    saved = config.recompile_limit, config.specialize_float
    yield config
    config.recompile_limit, config.specialize_float = saved


def test_floats_are_graph_constants_and_a_new_value_recompiles():
    torch._dynamo.reset()
    compiling.configure_dynamo()
    recorder = _Recorder()
    fn = torch.compile(rms_norm_scaled, dynamic=True, backend=recorder)
    x, w = torch.randn(6, 32), torch.randn(32)
    for eps in (1e-6, 1e-6, 1e-5):
        torch.testing.assert_close(fn(x, w, eps, 1.0), rms_norm_scaled(x, w, eps, 1.0))
    assert len(recorder.graphs) == 2  # one graph per eps value, reused for the repeated one
    for gm in recorder.graphs:
        tensors = [v for v in _placeholder_values(gm) if isinstance(v, torch.Tensor)]
        # x and weight only: no 0-dim fp64 CPU tensor standing for eps or the offset
        assert [t.dim() for t in tensors] == [2, 1], [(t.shape, t.dtype) for t in tensors]


def test_settings_never_lower_a_users_limit(_dynamo_config):
    config = _dynamo_config
    config.recompile_limit = 4
    compiling.configure_dynamo()
    assert config.recompile_limit == compiling.RECOMPILE_LIMIT and config.specialize_float
    config.recompile_limit = 500
    compiling.compile_fn(rms_norm_scaled, dynamic=True)
    assert config.recompile_limit == 500


def test_a_count_inside_a_compiled_region_does_not_recompile_it():
    """A count traced into a graph guarded the graph on the counter's value: a recompile per call (H200, 26B)."""
    from streamtune.kernels.counters import calls, count, reset

    def piece(x):
        count("traced_piece")
        return x * 2 + 1

    torch._dynamo.reset()
    reset()
    recorder = _Recorder()
    fn = torch.compile(piece, dynamic=True, backend=recorder)
    for _ in range(4):
        torch.testing.assert_close(fn(torch.ones(3)), torch.full((3,), 3.0))
        count("outside")
    assert len(recorder.graphs) == 1
    assert calls("outside") == 4 and calls("traced_piece") == 0  # counted on the host only


def test_checkpoint_early_stop_is_not_a_compile_failure():
    from torch.utils.checkpoint import _StopRecomputationError

    assert not compiling.is_compile_failure(_StopRecomputationError())
    assert compiling.is_compile_failure(RuntimeError("Triton lowering failed"))


def test_a_compiled_piece_lets_checkpoint_early_stop_through(monkeypatch):
    """Non-reentrant checkpointing ends its recompute by raising from the last saved tensor's hook, here inside the
    compiled norm: the piece's fallback caught that, marked itself broken and re-ran eagerly, which the checkpoint
    refused ("target_frame.early_stop is set"; H200, compiled layers)."""
    from torch.utils.checkpoint import checkpoint

    from streamtune.kernels import fused

    torch._dynamo.reset()
    monkeypatch.setattr(fused, "_STATE", {"compiled": {}})
    monkeypatch.setattr(fused, "FALLBACK", compiling.CompileFallback("fused", "eager"))
    monkeypatch.setattr(compiling, "compile_fn", lambda fn, dynamic: torch.compile(fn, backend="aot_eager"))
    weight = torch.randn(16)

    def block(x):
        return fused.run_fused("rms_norm_scaled", x * 2, weight, 1e-6, 1.0)  # the norm saves the last tensors

    x = torch.randn(4, 16, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).square().sum().backward()
    expected = torch.autograd.grad(rms_norm_scaled(x * 2, weight, 1e-6, 1.0).square().sum(), x)[0]
    assert not fused.FALLBACK.broken
    torch.testing.assert_close(x.grad, expected)


def test_fallback_warns_once_runs_eager_after_a_failure_and_reraises_what_is_not_one():
    from torch.utils.checkpoint import _StopRecomputationError

    fallback = compiling.CompileFallback("the piece", "it runs eagerly (x=y silences this)")
    tries = []

    def failing(value):
        tries.append(value)
        raise RuntimeError("InductorError: no compiler")

    assert fallback.run(lambda v: v + 1, lambda v: v - 1, 1) == 2 and not fallback.broken
    with pytest.warns(RuntimeWarning, match=r"the piece could not be compiled here \(RuntimeError: Inductor.*x=y"):
        assert fallback.run(failing, lambda v: v - 1, 5) == 4
    assert fallback.run(failing, lambda v: v - 1, 6) == 5 and tries == [5]  # not tried again
    assert fallback.broken and "no compiler" in fallback.failure
    fallback.reset()
    for control_flow in (_StopRecomputationError(), torch.OutOfMemoryError("CUDA out of memory")):
        def raising(value, exc=control_flow):
            raise exc

        with pytest.raises(type(control_flow)):
            fallback.run(raising, lambda v: v, 0)
        assert not fallback.broken
