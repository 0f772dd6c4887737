"""nf4 codec: every decoded value is absmax * the NF4 level its index names, and that level is nearest."""

import math
import sys

import pytest
import torch

from streamtune.quant import NF4_LEVELS, get_codec, nf4

LEVELS64 = torch.tensor(NF4_LEVELS, dtype=torch.float64)
CODEC_NAMES = ["nf4", "nf4-fp32absmax"]


def _unpack_indices(q, numel):
    high, low = (q >> 4).to(torch.int64), (q & 15).to(torch.int64)
    return torch.stack([high, low], dim=1).reshape(-1)[:numel]


def _blocks64(tensor, num_blocks):
    flat = torch.zeros(num_blocks * 64, dtype=torch.float64)
    flat[: tensor.numel()] = tensor.double().reshape(-1)
    return flat.view(num_blocks, 64)


def _check_structure(codec, x):
    parts = codec.encode(x)
    numel, num_blocks = x.numel(), nf4.num_blocks(x.numel())
    absmax = codec.block_absmax(parts)[:num_blocks].double()
    index = _unpack_indices(parts["q"], num_blocks * 64).view(num_blocks, 64)
    decoded = codec.decode(parts, tuple(x.shape), torch.float32).double().reshape(-1)
    expected = (absmax[:, None] * LEVELS64[index]).reshape(-1)[:numel]
    torch.testing.assert_close(decoded, expected, rtol=2.0**-22, atol=0)

    values = _blocks64(x, num_blocks)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = values / safe[:, None]
    distance = (normalized[..., None] - LEVELS64).abs()
    chosen = distance.gather(-1, index[..., None]).squeeze(-1)
    assert torch.all(chosen <= distance.amin(dim=-1) + 1e-6)
    true_absmax = values.abs().amax(dim=1)
    return parts, absmax, true_absmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (130,), (3, 7, 65), (8, 64), (5, 70001)])
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decoded_values_are_absmax_times_nearest_level(name, shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    _check_structure(get_codec(name), x)


def test_fp32_absmax_is_the_exact_block_absmax():
    x = torch.randn(10, 100, dtype=torch.bfloat16)
    _, absmax, true_absmax = _check_structure(get_codec("nf4-fp32absmax"), x)
    assert torch.equal(absmax, true_absmax)


def test_double_quantized_absmax_relative_error_bound():
    generator = torch.Generator().manual_seed(1)
    block_scales = torch.exp(torch.randn(600, 1, generator=generator) * 2)
    x = (torch.randn(600, 64, generator=generator) * block_scales).to(torch.bfloat16)
    x[17] = 0
    parts, absmax, true_absmax = _check_structure(get_codec("nf4"), x)
    assert absmax[17] == 0
    group_of_block = torch.arange(600) // nf4.DQ_GROUP_BLOCKS
    step = parts["absmax_scale"].double()[group_of_block]
    bound = torch.exp2(step / 2) - 1 + 1e-6
    positive = true_absmax > 0
    relative = (absmax[positive] - true_absmax[positive]).abs() / true_absmax[positive]
    assert torch.all(relative <= bound[positive])
    assert float(relative.max()) < 0.05


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_error_bound_per_block(name):
    x = torch.randn(4, 4096, dtype=torch.float32)
    codec = get_codec(name)
    parts, absmax, true_absmax = _check_structure(codec, x)
    decoded = codec.decode(parts, x.shape, torch.float64).reshape(-1, 64)
    error = (x.double().reshape(-1, 64) - decoded).abs().amax(dim=1)
    max_half_gap = float((LEVELS64[1:] - LEVELS64[:-1]).max()) / 2
    bound = absmax * max_half_gap + (absmax - true_absmax).abs() + 1e-6 * true_absmax
    assert torch.all(error <= bound)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_zero_scalar_and_empty(name):
    codec = get_codec(name)
    zeros = torch.zeros(3, 100, dtype=torch.bfloat16)
    decoded = codec.decode(codec.encode(zeros), zeros.shape, torch.bfloat16)
    assert torch.equal(decoded, zeros)
    scalar = torch.tensor(0.75, dtype=torch.float16)
    assert codec.decode(codec.encode(scalar), (), torch.float16).item() == 0.75
    empty = torch.empty(0, 4)
    parts = codec.encode(empty)
    assert all(p.numel() == 0 for p in parts.values())
    assert codec.decode(parts, (0, 4), torch.float32).shape == (0, 4)


def test_nibble_order_and_sizes():
    x = torch.tensor([1.0, -1.0, 0.0] + [0.0] * 61)
    parts = get_codec("nf4-fp32absmax").encode(x)
    assert parts["q"][0] == (15 << 4) | 0
    assert parts["q"][1] >> 4 == 7
    numel = 3 * 7 * 65
    blocks = math.ceil(numel / 64)
    layout = {s.name: s.shape for s in get_codec("nf4").layout((3, 7, 65), torch.bfloat16)}
    assert layout == {
        "q": (blocks * 32,),
        "absmax_q": (256,),
        "absmax_scale": (1,),
        "absmax_offset": (1,),
    }


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_chunked_torch_decode_matches(name, monkeypatch):
    codec = get_codec(name)
    x = torch.randn(7, 101, dtype=torch.bfloat16)
    parts = codec.encode(x)
    whole = codec.decode(parts, x.shape, torch.bfloat16)
    monkeypatch.setattr(nf4, "CPU_DECODE_CHUNK_BLOCKS", 3)
    assert torch.equal(codec.decode(parts, x.shape, torch.bfloat16), whole)


def test_unknown_backend_is_rejected():
    codec = get_codec("nf4")
    x = torch.randn(64)
    with pytest.raises(ValueError, match="backend 'cuda'.*allowed: auto, torch, triton"):
        codec.decode(codec.encode(x), (64,), torch.float32, backend="cuda")


def _peak_traced_bytes(function, *args):
    tracemalloc = pytest.importorskip("tracemalloc")
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_encode_memory_is_bounded_by_chunks_not_tensor():
    x = torch.randn(256, 1 << 18, dtype=torch.bfloat16)  # 64 Mi elements: 64 encode chunks of nf4
    full_fp32_bytes = x.numel() * 4
    # NumPy buffers are traced: a whole float32 copy would show up
    assert _peak_traced_bytes(lambda t: t.float().numpy().copy(), x) >= full_fp32_bytes
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name in ("nf4", "nf4-fp32absmax", "int8"):
            peak_bytes = _peak_traced_bytes(get_codec(name).encode, x)
            assert peak_bytes < full_fp32_bytes / 8, (name, peak_bytes)
    finally:
        torch.set_num_threads(threads)


class _BrokenKernelModule:
    @staticmethod
    def nf4_decode_triton(*args):
        raise RuntimeError("no compiler")


def test_auto_backend_falls_back_to_torch_when_the_kernel_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "streamtune.quant.nf4_triton", _BrokenKernelModule)
    monkeypatch.setattr(nf4._TRITON, "failure", None)
    codec = get_codec("nf4")
    x = torch.randn(3, 100)
    parts = codec.encode(x)
    expected = codec.decode(parts, x.shape, torch.float32, backend="torch")
    with pytest.raises(RuntimeError, match="no compiler"):
        codec.decode(parts, x.shape, torch.float32, backend="triton")
    out = torch.empty(3, 100)
    absmax = codec.block_absmax(parts)
    with pytest.warns(UserWarning, match="Triton NF4 decode failed, using the torch decode: RuntimeError: no compiler"):
        assert nf4._TRITON.run("auto", parts["q"], absmax, nf4.level_table(out.device), out.view(-1)) is False
    assert nf4._TRITON.failure is not None
    assert not nf4._TRITON.wanted("auto", torch.device("cuda"))
    assert torch.equal(codec.decode(parts, x.shape, torch.float32), expected)
