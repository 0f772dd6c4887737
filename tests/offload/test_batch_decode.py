"""Batched int8 / nf4 decode: one launch per codec per layer bind, tables checked against the buffers, the kernels
equal to the per-tensor decode (in Triton's CPU interpreter where Triton is installed), and a safe fall-back."""

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
    assert bind_views(pack, pack.buffer, workspace).batch == []  # a CPU buffer
    entries = bind_views(pack, pack.buffer, workspace).entries
    assert batch_decode.build_layer_decode(entries[:1], pack.buffer, workspace) is None


def _fake_kernels(monkeypatch, int8_fn, nf4_fn=None):
    for name, attr, fn in (("int8_triton", "int8_decode_many", int8_fn), ("nf4_triton", "nf4_decode_many", nf4_fn)):
        module = types.ModuleType(f"streamtune.quant.{name}")
        setattr(module, attr, fn)
        monkeypatch.setitem(sys.modules, f"streamtune.quant.{name}", module)


def _bind_with_plans(pack, workspace):
    views = bind_views(pack, pack.buffer, workspace)
    views.batch = [p for kind in batch_decode.KINDS
                   if (p := batch_decode.build_layer_decode(views.entries, pack.buffer, workspace, kind))]
    bind(pack, pack.buffer, workspace, views)
    return views


def _per_tensor(entry, pack):
    parts = {p.name: pack.buffer[p.offset_bytes:p.offset_bytes + p.nbytes].view(p.dtype).view(p.shape)
             for p in entry.parts}
    return entry.codec.decode(parts, entry.shape, entry.dtype)


@pytest.mark.parametrize("codec", ["int8", "nf4"])
@pytest.mark.parametrize("broken", ["raises", "wrong values"])
def test_a_broken_kernel_turns_batching_off_and_the_layer_still_binds_exactly(monkeypatch, broken, codec):
    def kernel(*args):
        if broken == "raises":
            raise RuntimeError("no kernel")
        args[3 if codec == "nf4" else 2].zero_()  # the output buffer

    layer, pack, workspace, _ = _packed(codec)
    _fake_kernels(monkeypatch, kernel, kernel)
    with pytest.warns(RuntimeWarning, match=f"batched {codec} decode is off"):
        _bind_with_plans(pack, workspace)
    assert batch_decode.disabled_reason(codec) is not None
    for entry in pack.tensors:
        if entry.param.dim() == 2:
            assert torch.equal(entry.param.data, _per_tensor(entry, pack)), entry.name


def _int8_contract(q_bytes, scales, out, table, total_tiles):
    """The int8 kernel's contract, in torch."""
    for q_off, scale_off, out_off, rows, cols, _ in table.tolist():
        q = q_bytes[q_off:q_off + rows * cols].view(rows, cols).float()
        out[out_off:out_off + rows * cols].copy_((q * scales[scale_off:scale_off + rows, None]).flatten())


def _nf4_contract(q_bytes, f32, levels, out, table, total_programs):
    """The nf4 kernel's contract, in torch."""
    from streamtune.quant.nf4 import dequantize_absmax

    for q_off, code_off, scale_off, offset_off, out_off, numel, _ in table.tolist():
        idx = torch.arange(numel)
        packed = q_bytes[q_off:q_off + (numel + 1) // 2].long()[idx // 2]
        level = levels[(packed >> (4 - (idx % 2) * 4)) & 15]
        blocks, groups = -(-numel // 64), -(-numel // 16384)
        codes = q_bytes[code_off:code_off + groups * 256].view(groups, 256)
        absmax = dequantize_absmax(codes, f32[scale_off:scale_off + groups], f32[offset_off:offset_off + groups])
        out[out_off:out_off + numel].copy_(level * absmax.flatten()[:blocks][idx // 64])


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_a_kernel_that_matches_is_checked_once_then_trusted(monkeypatch, codec):
    calls = []
    contract = _int8_contract if codec == "int8" else _nf4_contract
    _fake_kernels(monkeypatch, lambda *a: calls.append(1) or contract(*a), lambda *a: calls.append(1) or contract(*a))
    layer, pack, workspace, _ = _packed(codec)
    checks = []
    original = batch_decode._first_mismatch
    monkeypatch.setattr(batch_decode, "_first_mismatch", lambda *a: checks.append(1) or original(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _bind_with_plans(pack, workspace)
        _bind_with_plans(pack, workspace)
    assert len(calls) == 2 and len(checks) == 1 and batch_decode.disabled_reason(codec) is None
    for entry in pack.tensors:
        if entry.param.dim() == 2:
            torch.testing.assert_close(entry.param.data, _per_tensor(entry, pack), rtol=0.01, atol=0), entry.name


def test_nf4_table_rows_and_programs():
    _, pack, workspace, _ = _packed("nf4")
    entries = bind_views(pack, pack.buffer, workspace).entries
    plan = batch_decode.build_layer_decode(entries, pack.buffer, workspace, "nf4")
    assert plan is not None and plan.kind == "nf4" and len(plan.positions) == 2
    rows = plan.table.tolist()
    assert [r[5] for r in rows] == [1100 * 200, 200 * 37]
    assert rows[1][6] == -(-1100 * 200 // 2048) and plan.num_programs == rows[1][6] + -(-200 * 37 // 2048)
    assert batch_decode.build_layer_decode(entries, pack.buffer, workspace, "int8") is None


_INTERPRETED = r"""
import torch
from streamtune.models.build import build_model
from streamtune.offload import batch_decode
from streamtune.offload.host import bind_views, pack_layer
from streamtune.quant import get_codec
from streamtune.quant.int8_triton import int8_decode_many
from streamtune.quant.nf4 import level_table
from streamtune.quant.nf4_triton import nf4_decode_many
from streamtune.quant.policy import should_compress
from tests.offload.test_batch_decode import _packed

def gemma_layer(codec):  # a real decoder layer: attention, dense MLP and fused 3-D experts, the engine's policy
    model, _ = build_model("tiny-gemma4", torch.bfloat16, seed=0)
    layer = model.model.layers[0].requires_grad_(False)
    choose = lambda name, shape: get_codec(codec if should_compress(name, shape, codec) else "bf16")
    pack = pack_layer(0, layer, choose, torch.device("cpu"), pin=False)
    return pack, torch.empty(pack.decoded_nbytes, dtype=torch.uint8)

for codec in ("int8", "nf4"):
    _, pack, workspace, _ = _packed(codec)
    for pack, workspace in [(pack, workspace), gemma_layer(codec)]:
        entries = bind_views(pack, pack.buffer, workspace).entries
        plan = batch_decode.build_layer_decode(entries, pack.buffer, workspace, codec)
        assert plan is not None and len(plan.positions) >= 2
        # fp32 output: the interpreter's bf16 rounding is not the GPU's
        out32 = torch.zeros(workspace.numel(), dtype=torch.float32)
        f32 = pack.buffer[: pack.buffer.numel() // 4 * 4].view(torch.float32)
        if codec == "int8":
            int8_decode_many(pack.buffer.view(torch.int8), f32, out32, plan.table, plan.num_programs)
        else:
            nf4_decode_many(pack.buffer, f32, level_table(torch.device("cpu")), out32, plan.table, plan.num_programs)
        for position in plan.positions:
            entry, parts, out = entries[position]
            start = entry.decoded_offset_bytes // 2
            got = out32[start:start + out.numel()].view(entry.shape)
            want = entry.codec.decode(parts, entry.shape, torch.float32)
            assert torch.allclose(got, want, rtol=1e-6, atol=0), (codec, entry.name, (got - want).abs().max())
        print(codec, len(plan.positions), "tensors", [tuple(entries[p][0].shape) for p in plan.positions])
print("interpreted ok")
"""


def test_the_kernel_equals_the_codec_product_in_tritons_interpreter():
    """Runs where Triton is installed (not on the CPU CI image): the real kernel, on the CPU, through the table."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "interpreted ok" in result.stdout, result.stderr[-2000:]
