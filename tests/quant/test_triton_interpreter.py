"""The Triton NF4 and int8 kernels, run by Triton's CPU interpreter, matches the torch decode (skipped without Triton)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import torch
    from streamtune.quant import get_codec
    for name in ("nf4", "nf4-fp32absmax"):
        codec = get_codec(name)
        for shape, dtype in (((3, 7, 65), torch.float32), ((4097,), torch.float16), ((5, 64), torch.bfloat16)):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
            parts = codec.encode(x)
            by_torch = codec.decode(parts, shape, dtype, backend="torch")
            by_triton = codec.decode(parts, shape, dtype, backend="triton")
            # the interpreter rounds float32 -> bfloat16 toward zero, a GPU to nearest: allow one bf16 step
            tolerance = 2.0 ** -7 if dtype == torch.bfloat16 else 0.0
            torch.testing.assert_close(by_triton, by_torch, rtol=tolerance, atol=0)
    codec = get_codec("int8")
    for shape in ((3, 7, 65), (4097,), (9, 1030)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        parts = codec.encode(x)
        for dtype in (torch.float32, torch.bfloat16):
            by_torch = codec.decode(parts, shape, dtype, backend="torch")
            by_triton = codec.decode(parts, shape, dtype, backend="triton")
            tolerance = 2.0 ** -7 if dtype == torch.bfloat16 else 0.0
            torch.testing.assert_close(by_triton, by_torch, rtol=tolerance, atol=0)
    print("OK")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_triton_kernel_in_interpreter_matches_torch():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
