"""CUDA decode equals CPU decode (torch and Triton paths), from packed slot views; decode throughput."""

import pytest
import torch

from streamtune.quant import CODECS, get_codec, pack_parts, part_views, place_parts
from streamtune.quant.bench import benchmark_decode
from streamtune.quant.nf4 import Nf4Codec, triton_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SHAPES = [(3, 7, 65), (16, 1408, 704), (2048,), (1,)]
ONE_ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-22}


def _packed_cuda_views(codec, parts, shape, dtype):
    placed, end = place_parts(codec.layout(shape, dtype), start_bytes=512)
    host = torch.zeros(end, dtype=torch.uint8).pin_memory()
    pack_parts(parts, placed, host)
    return part_views(host.to("cuda", non_blocking=True), placed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(CODECS))
def test_cuda_decode_equals_cpu_decode(name, shape, dtype):
    codec = get_codec(name)
    x = torch.randn(shape).to(dtype)
    parts = codec.encode(x)
    expected = codec.decode(parts, shape, dtype)
    views = _packed_cuda_views(codec, parts, shape, dtype)
    out = torch.empty(shape, dtype=dtype, device="cuda")
    codec.decode(views, shape, dtype, out=out)
    assert not out.requires_grad
    if isinstance(codec, Nf4Codec):
        # CUDA's exp2 (double-quantized absmax) may differ from the CPU's by one float32 ulp
        torch.testing.assert_close(out.cpu(), expected, rtol=ONE_ULP[dtype], atol=0)
        torch_path = codec.decode(views, shape, dtype, backend="torch")
        torch.testing.assert_close(torch_path.cpu(), expected, rtol=ONE_ULP[dtype], atol=0)
        if dtype != torch.float32:  # in float32 one ulp of a block's absmax shows in all 64 of its elements
            assert (torch_path.cpu() == expected).float().mean() > 0.999
    else:
        assert torch.equal(out.cpu(), expected)


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["nf4", "nf4-fp32absmax"])
def test_triton_decode_equals_torch_decode(name, dtype):
    codec = get_codec(name)
    shape = (64, 1408, 70)
    parts = {k: v.cuda() for k, v in codec.encode(torch.randn(shape).to(dtype)).items()}
    by_torch = codec.decode(parts, shape, dtype, backend="torch")
    by_triton = codec.decode(parts, shape, dtype, backend="triton")
    exact_fraction = (by_torch == by_triton).float().mean().item()
    print(f"{name} {dtype}: triton == torch for {exact_fraction:.6f} of elements")
    torch.testing.assert_close(by_triton, by_torch, rtol=2.0**-7, atol=0)
    assert exact_fraction > 0.999


def test_decode_throughput_on_cuda():
    results = benchmark_decode("cuda", numel=1 << 28)
    for name, gbps in results.items():
        print(f"decode {name}: {gbps:.1f} GB/s of bf16 output")
    assert all(gbps > 0 for gbps in results.values())
    if triton_available():
        codec = get_codec("nf4")
        shape = (1 << 14, 1 << 14)
        parts = {k: v.cuda() for k, v in codec.encode(torch.randn(shape).to(torch.bfloat16)).items()}
        out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
        for backend in ("torch", "triton"):
            codec.decode(parts, shape, torch.bfloat16, out=out, backend=backend)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                codec.decode(parts, shape, torch.bfloat16, out=out, backend=backend)
            stop.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(stop) / 5 / 1000
            print(f"nf4 decode ({backend}): {out.numel() * 2 / seconds / 1e9:.1f} GB/s of bf16 output")


def test_int8_triton_decode_is_exact_and_faster_than_torch():
    from streamtune.quant.int8_triton import int8_decode_triton  # noqa: F401  (the device image has Triton)

    codec = get_codec("int8")
    shape = (128, 1408, 2816)  # the 26B preset's fused gate_up experts
    parts = {k: v.cuda() for k, v in codec.encode(torch.randn(shape).to(torch.bfloat16)).items()}
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    speeds = {}
    for backend in ("torch", "triton"):
        codec.decode(parts, shape, torch.bfloat16, out=out, backend=backend)
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            codec.decode(parts, shape, torch.bfloat16, out=out, backend=backend)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 5e3
        speeds[backend] = out.numel() * 3 / seconds / 1e9  # int8 read + bf16 written
        print(f"int8 decode ({backend}): {speeds[backend]:.0f} GB/s moved, {seconds * 1e3:.2f} ms")
    by_torch = codec.decode(parts, shape, torch.bfloat16, backend="torch")
    assert torch.equal(codec.decode(parts, shape, torch.bfloat16, backend="triton"), by_torch)
    assert speeds["triton"] > speeds["torch"]
