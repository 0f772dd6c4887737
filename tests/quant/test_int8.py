"""int8 codec: round-trip bounds against a float64 reference, per row and per expert."""

import pytest
import torch

from streamtune.quant import codecs, get_codec

INT8 = get_codec("int8")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _rows64(tensor):
    last = tensor.shape[-1] if tensor.dim() else 1
    return tensor.double().reshape(-1, last)


def _random(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.rand(shape[:-1] + (1,), generator=generator) * 10 + 1e-3 if shape else 1.0
    return (torch.randn(shape, generator=generator) * scales).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 130), (200,), (600, 1000)])
def test_row_error_bound_against_float64(shape, dtype):
    x = _random(shape, dtype)
    parts = INT8.encode(x)
    decoded = INT8.decode(parts, shape, torch.float64)
    x_rows, decoded_rows = _rows64(x), _rows64(decoded)
    absmax = x_rows.abs().amax(dim=1)
    error = (x_rows - decoded_rows).abs().amax(dim=1)
    assert torch.all(error <= absmax / 254 * (1 + 1e-5) + 1e-30), (error / absmax).max()
    torch.testing.assert_close(parts["scale"].double().reshape(-1), absmax / 127, rtol=1e-6, atol=0)
    q_rows = parts["q"].reshape(-1, x_rows.shape[1]).to(torch.int32)
    assert int(q_rows.abs().max()) == 127
    assert torch.equal(q_rows.abs().amax(dim=1), torch.full_like(absmax, 127, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_dtype_decode_adds_at_most_one_output_rounding(dtype):
    x = _random((16, 300), dtype, seed=1)
    decoded = INT8.decode(INT8.encode(x), x.shape, dtype)
    assert decoded.dtype == dtype
    absmax = _rows64(x).abs().amax(dim=1)
    error = (_rows64(x) - _rows64(decoded)).abs().amax(dim=1)
    bound = absmax / 254 + absmax * UNIT_ROUNDOFF[dtype]
    assert torch.all(error <= bound * (1 + 1e-6))


def test_zero_rows_decode_to_zero_without_nan():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    x[1] = 0
    x[3] = 0
    parts = INT8.encode(x)
    assert parts["scale"][1] == 0 and parts["scale"][3] == 0
    decoded = INT8.decode(parts, x.shape, torch.bfloat16)
    assert not torch.isnan(decoded).any()
    assert torch.equal(decoded[1], torch.zeros(64, dtype=torch.bfloat16))
    zeros = torch.zeros(3, 5, 7)
    assert torch.equal(INT8.decode(INT8.encode(zeros), zeros.shape, torch.float32), zeros)


def test_expert_tensor_scales_per_expert_and_row():
    experts = _random((4, 6, 64), torch.bfloat16, seed=2)
    parts = INT8.encode(experts)
    assert parts["scale"].shape == (4, 6)
    louder = experts.clone()
    louder[2] *= 1000
    louder_parts = INT8.encode(louder)
    for expert in (0, 1, 3):
        assert torch.equal(louder_parts["q"][expert], parts["q"][expert])
        assert torch.equal(louder_parts["scale"][expert], parts["scale"][expert])
    assert torch.all(louder_parts["scale"][2] > parts["scale"][2] * 500)


def test_zero_dim_and_empty_tensors():
    scalar = torch.tensor(-3.5)
    parts = INT8.encode(scalar)
    assert parts["q"].shape == () and parts["scale"].shape == ()
    assert INT8.decode(parts, (), torch.float32).item() == pytest.approx(-3.5)
    empty = torch.empty(0, 8, dtype=torch.bfloat16)
    parts = INT8.encode(empty)
    assert parts["q"].shape == (0, 8) and parts["scale"].shape == (0,)
    assert INT8.decode(parts, (0, 8), torch.bfloat16).shape == (0, 8)


def test_chunked_cpu_decode_matches_one_shot(monkeypatch):
    x = _random((37, 50), torch.bfloat16, seed=3)
    parts = INT8.encode(x)
    whole = INT8.decode(parts, x.shape, torch.bfloat16)
    monkeypatch.setattr(codecs, "CPU_DECODE_CHUNK_NUMEL", 120)
    assert torch.equal(INT8.decode(parts, x.shape, torch.bfloat16), whole)
    expected = (parts["q"].double() * parts["scale"].double()[:, None]).to(torch.bfloat16)
    assert torch.equal(whole, expected)


def test_encode_is_independent_of_thread_count():
    x = _random((300, 2000), torch.bfloat16, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = INT8.encode(x)
    finally:
        torch.set_num_threads(threads)
    many = INT8.encode(x)
    assert torch.equal(single["q"], many["q"]) and torch.equal(single["scale"], many["scale"])


class _BrokenInt8Kernel:
    @staticmethod
    def int8_decode_triton(*args):
        raise RuntimeError("no compiler")


def test_decode_backend_is_checked_and_cpu_auto_is_torch():
    x = torch.randn(4, 33)
    parts = INT8.encode(x)
    with pytest.raises(ValueError, match="backend 'cuda'.*allowed: auto, torch, triton"):
        INT8.decode(parts, x.shape, torch.float32, backend="cuda")
    assert not codecs._INT8_TRITON.wanted("auto", torch.device("cpu"))
    torch.testing.assert_close(INT8.decode(parts, x.shape, torch.float32), x, atol=x.abs().max().item() / 254, rtol=0)


def test_auto_decode_falls_back_to_torch_once_when_the_kernel_fails(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "streamtune.quant.int8_triton", _BrokenInt8Kernel)
    monkeypatch.setattr(codecs._INT8_TRITON, "failure", None)
    x = torch.randn(3, 100)
    parts = INT8.encode(x)
    expected = INT8.decode(parts, x.shape, torch.float32, backend="torch")
    with pytest.raises(RuntimeError, match="no compiler"):
        INT8.decode(parts, x.shape, torch.float32, backend="triton")
    out = torch.empty(3, 100)
    with pytest.warns(UserWarning, match="Triton int8 decode failed, using the torch decode: RuntimeError: no compiler"):
        assert codecs._INT8_TRITON.run("auto", parts["q"].view(3, 100), parts["scale"], out) is False
    assert not codecs._INT8_TRITON.wanted("auto", torch.device("cuda"))
    assert torch.equal(INT8.decode(parts, x.shape, torch.float32), expected)
