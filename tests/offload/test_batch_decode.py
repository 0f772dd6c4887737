"""Batched int8 decode: one launch per layer bind, its table checked against the buffers, the kernel equal to the
per-tensor decode (in Triton's CPU interpreter where Triton is installed), and a safe fall-back."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from streamtune.offload import batch_decode
from streamtune.offload.host import bind, bind_views, pack_layer
from streamtune.quant import get_codec

REPO = Path(__file__).resolve().parents[2]


def _layer():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(1100, 200), torch.nn.Linear(200, 37), torch.nn.LayerNorm(37))
    return layer.to(torch.bfloat16).requires_grad_(False)


def _packed(codec="int8"):
    layer = _layer()
    expected = {n: p.detach().clone() for n, p in layer.named_parameters()}
    pack = pack_layer(0, layer, lambda name, shape: get_codec(codec if len(shape) == 2 else "bf16"),
                      torch.device("cpu"), pin=False)
    workspace = torch.empty(max(pack.decoded_nbytes, 1), dtype=torch.uint8)
    return layer, pack, workspace, expected


@pytest.fixture(autouse=True)
def _fresh_state():
    batch_decode.reset()
    yield
    batch_decode.reset()


def test_the_table_lists_each_int8_tensor_inside_the_buffers():
    _, pack, workspace, _ = _packed()
    entries = bind_views(pack, pack.buffer, workspace).entries
    plan = batch_decode.build_layer_decode(entries, pack.buffer, workspace)
    assert plan is not None and len(plan.positions) == 2  # the two weights; biases and the norm stay bf16
    rows = plan.table.tolist()
    for (q_off, scale_off, out_off, num_rows, num_cols, _first), position in zip(rows, plan.positions):
        entry = entries[position][0]
        assert (num_rows, num_cols) == tuple(entry.shape)
        assert q_off + num_rows * num_cols <= pack.buffer.numel() and 4 * (scale_off + num_rows) <= pack.buffer.numel()
        assert 2 * (out_off + num_rows * num_cols) <= workspace.numel()
    assert rows[1][5] > rows[0][5] == 0  # tiles follow one another


def test_no_plan_on_the_cpu_or_with_fewer_than_two_int8_tensors():
    _, pack, workspace, _ = _packed()
    assert bind_views(pack, pack.buffer, workspace).batch is None  # a CPU buffer
    entries = bind_views(pack, pack.buffer, workspace).entries
    assert batch_decode.build_layer_decode(entries[:1], pack.buffer, workspace) is None


def _fake_kernel(monkeypatch, fn):
    module = types.ModuleType("streamtune.quant.int8_triton")
    module.int8_decode_many = fn
    monkeypatch.setitem(sys.modules, "streamtune.quant.int8_triton", module)


def _bind_with_plan(pack, workspace):
    views = bind_views(pack, pack.buffer, workspace)
    views.batch = batch_decode.build_layer_decode(views.entries, pack.buffer, workspace)
    bind(pack, pack.buffer, workspace, views)
    return views


@pytest.mark.parametrize("broken", ["raises", "wrong values"])
def test_a_broken_kernel_turns_batching_off_and_the_layer_still_binds_exactly(monkeypatch, broken):
    def kernel(q_bytes, scales, out, table, total_tiles):
        if broken == "raises":
            raise RuntimeError("no kernel")
        out.zero_()

    layer, pack, workspace, _ = _packed()
    _fake_kernel(monkeypatch, kernel)
    with pytest.warns(RuntimeWarning, match="batched int8 decode is off"):
        _bind_with_plan(pack, workspace)
    assert batch_decode.disabled_reason() is not None
    for name, param in layer.named_parameters():
        if param.dim() == 2:
            codec = get_codec("int8")
            entry = next(e for e in pack.tensors if e.param is param)
            parts = {p.name: pack.buffer[p.offset_bytes:p.offset_bytes + p.nbytes].view(p.dtype).view(p.shape)
                     for p in entry.parts}
            assert torch.equal(param.data, codec.decode(parts, entry.shape, entry.dtype)), name


def test_a_kernel_that_matches_is_checked_once_then_trusted(monkeypatch):
    calls = []

    def kernel(q_bytes, scales, out, table, total_tiles):  # the kernel's contract, in torch
        calls.append(total_tiles)
        for q_off, scale_off, out_off, rows, cols, _ in table.tolist():
            q = q_bytes[q_off:q_off + rows * cols].view(rows, cols).float()
            product = q * scales[scale_off:scale_off + rows, None]
            out[out_off:out_off + rows * cols].copy_(product.flatten())

    layer, pack, workspace, _ = _packed()
    _fake_kernel(monkeypatch, kernel)
    checks = []
    original = batch_decode._first_mismatch
    monkeypatch.setattr(batch_decode, "_first_mismatch", lambda *a: checks.append(1) or original(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _bind_with_plan(pack, workspace)
        _bind_with_plan(pack, workspace)
    assert len(calls) == 2 and len(checks) == 1 and batch_decode.disabled_reason() is None


_INTERPRETED = r"""
import torch
from streamtune.models.build import build_model
from streamtune.offload import batch_decode
from streamtune.offload.host import bind_views, pack_layer
from streamtune.quant import get_codec
from streamtune.quant.int8_triton import int8_decode_many
from streamtune.quant.policy import should_compress
from tests.offload.test_batch_decode import _packed

def gemma_layer():  # a real decoder layer: attention, dense MLP and fused 3-D experts, the engine's codec policy
    model, _ = build_model("tiny-gemma4", torch.bfloat16, seed=0)
    layer = model.model.layers[0].requires_grad_(False)
    codec = lambda name, shape: get_codec("int8" if should_compress(name, shape, "int8") else "bf16")
    pack = pack_layer(0, layer, codec, torch.device("cpu"), pin=False)
    return pack, torch.empty(pack.decoded_nbytes, dtype=torch.uint8)

_, pack, workspace, _ = _packed()
for pack, workspace in [(pack, workspace), gemma_layer()]:
    entries = bind_views(pack, pack.buffer, workspace).entries
    plan = batch_decode.build_layer_decode(entries, pack.buffer, workspace)
    assert plan is not None and len(plan.positions) >= 2
    # fp32 output: the interpreter's bf16 rounding is not the GPU's
    out32 = torch.zeros(workspace.numel(), dtype=torch.float32)
    int8_decode_many(plan.q_bytes, plan.scales, out32, plan.table, plan.total_tiles)
    for position in plan.positions:
        entry, parts, out = entries[position]
        start = entry.decoded_offset_bytes // 2
        got = out32[start:start + out.numel()].view(entry.shape)
        want = (parts["q"].float().view(-1, entry.shape[-1]) * parts["scale"].view(-1, 1)).view(entry.shape)
        assert torch.equal(got, want), entry.name
    print(len(plan.positions), "tensors", [tuple(entries[p][0].shape) for p in plan.positions])
print("interpreted ok")
"""


def test_the_kernel_equals_the_codec_product_in_tritons_interpreter():
    """Runs where Triton is installed (not on the CPU CI image): the real kernel, on the CPU, through the table."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "interpreted ok" in result.stdout, result.stderr[-2000:]
