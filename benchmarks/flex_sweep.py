"""FlexAttention ``kernel_options`` for Gemma4's head_dim-512 global layers: correctness and speed per option set.

One layer's attention (16 query heads, 2 kv heads, head_dim 512, causal, bf16) at ``--tokens``, forward and
forward + backward, for each option set below and for SDPA (memory-efficient and cuDNN where they run).
Each option set is checked against an fp32 SDPA reference (max abs error of the output and of dq) and
timed (median of ``--repeats`` after a compiling warm-up). An option set that fails to compile (e.g. too much
shared memory) is reported with its error. ``--wide`` adds streamtune's row-chunked GEMM attention at the given
chunk sizes. The table is printed last; ``--out`` writes the JSON.

    python benchmarks/flex_sweep.py --tokens 8192 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

# The options in use (streamtune.kernels.select) first, then variants: bigger forward tiles, more warps,
# a second pipeline stage, wider backward tiles, and the consumer-card (sm86/89) set.
OPTION_SETS: dict[str, dict[str, int]] = {
    "current_sm90": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32,
                     "num_stages": 1, "num_warps": 8},
    "m64n64_w8": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32,
                  "num_stages": 1, "num_warps": 8},
    "m128n32_w8": {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32,
                   "num_stages": 1, "num_warps": 8},
    "m64n32_s2": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32,
                  "num_stages": 2, "num_warps": 8},
    "bwd_n64": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
                "num_stages": 1, "num_warps": 8},
    "bwd_m16n64": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_M1": 16, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 16,
                   "num_stages": 1, "num_warps": 8},
    "w4": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32,
           "num_stages": 1, "num_warps": 4},
    "small_smem_sm89": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32,
                        "BLOCK_N2": 16, "num_stages": 1, "num_warps": 4},
    # head_dim 512: forward and backward options apart (``fwd_`` / ``bwd_`` prefixes)
    "m64n32_s2_bwd_w4": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 32, "fwd_num_stages": 2, "fwd_num_warps": 8,
                         "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 32,
                         "bwd_num_stages": 2, "bwd_num_warps": 4},
    "m128n32_s1_bwd_s2": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 32, "fwd_num_stages": 1, "fwd_num_warps": 8,
                          "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 32,
                          "bwd_num_stages": 2, "bwd_num_warps": 8},
    "m64n64_s2_bwd_s2": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 8,
                         "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 32,
                         "bwd_num_stages": 2, "bwd_num_warps": 8},
    # for the head_dim-256 sliding layers (Triton's defaults are the "defaults" set)
    "defaults": {},
    "m128n64_s2_w8": {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 2, "num_warps": 8},
    "m64n64_s2_w4": {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2, "num_warps": 4},
    "bwd_m64n64_s1_w8": {"BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64, "num_stages": 1,
                         "num_warps": 8},
    "m128n128_s1_w8": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_stages": 1, "fwd_num_warps": 8,
                       "bwd_num_stages": 2, "bwd_num_warps": 8},
    "m128n64_s2_w8_bwd_w4": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 8,
                             "bwd_num_stages": 2, "bwd_num_warps": 4},
    "bwd_m32n64_s2_w8": {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32, "num_stages": 2,
                         "num_warps": 8},
}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=512)
    p.add_argument("--window", type=int, default=0, help="sliding window (0: plain causal); Gemma4: 1024 on "
                   "its head_dim-256 layers (use --head-dim 256 --kv-heads 8)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sets", default=",".join(OPTION_SETS))
    p.add_argument("--wide", default="", help="comma-separated Mi fp32 scores per chunk of the row-chunked GEMM "
                   "attention (streamtune.kernels.wide_attention) to time, e.g. 32,64,128")
    p.add_argument("--out", default=None)
    return p.parse_args()


def _time(fn: Any, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    args = _args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    shape_q = (1, args.heads, args.tokens, args.head_dim)
    shape_kv = (1, args.kv_heads, args.tokens, args.head_dim)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)
    scale = 1.0
    reps = args.heads // args.kv_heads

    positions = torch.arange(args.tokens, device="cuda")
    dense = positions[:, None] >= positions[None, :]
    if args.window:
        dense &= positions[:, None] - positions[None, :] < args.window

    def sdpa(qq: Any, kk: Any, vv: Any) -> Any:
        return torch.nn.functional.scaled_dot_product_attention(
            qq, kk.repeat_interleave(reps, 1), vv.repeat_interleave(reps, 1), scale=scale,
            **({"attn_mask": dense} if args.window else {"is_causal": True}))

    with torch.no_grad():
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        ref = sdpa(qf, kf, vf)
        ref.backward(grad.float())
    ref_out, ref_dq = ref.detach(), qf.grad.detach()
    # the attended (query, key) pairs: the causal triangle, or its band of width --window
    num_pairs = int(dense.sum())
    flops_fwd = 4 * num_pairs * args.head_dim * args.heads
    window = args.window or args.tokens

    def mask_mod(b: Any, h: Any, qi: Any, ki: Any) -> Any:
        return (qi >= ki) & (qi - ki < window)

    block_mask = create_block_mask(mask_mod, None, None, args.tokens, args.tokens, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    rows = []

    def run_variant(name: str, forward: Any) -> None:
        row: dict[str, Any] = {"name": name}
        try:
            q.grad = k.grad = v.grad = None
            out = forward()
            out.backward(grad)
            row["out_err"] = float((out.float() - ref_out).abs().max())
            row["dq_err"] = float((q.grad.float() - ref_dq).abs().max())
            with torch.no_grad():
                row["fwd_ms"] = _time(forward, args.repeats)
            row["fwd_bwd_ms"] = _time(lambda: forward().backward(grad), args.repeats)
            row["fwd_bwd_tflops"] = 3.5 * flops_fwd / row["fwd_bwd_ms"] / 1e9
        except Exception as exc:  # a set that does not compile is a result
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)

    for backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION"):
        def sdpa_forward(backend: str = backend) -> Any:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                return sdpa(q, k, v)
        run_variant(f"sdpa_{backend.lower()}", sdpa_forward)
    from streamtune.kernels.wide_attention import wide_attention

    for mebi in [int(x) for x in args.wide.split(",") if x]:
        run_variant(f"wide_gemm_{mebi}Mi", lambda mebi=mebi: wide_attention(q, k, v, mask_mod, scale, mebi * 2**20))
    for name in [n for n in args.sets.split(",") if n]:
        options = OPTION_SETS[name]
        run_variant(f"flex_{name}", lambda options=options: compiled(q, k, v, block_mask=block_mask, scale=scale,
                                                                     enable_gqa=True, kernel_options=options))
    print("\n| variant | fwd ms | fwd+bwd ms | TFLOP/s (3.5x fwd) | out err | dq err |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | {r['error'][:80]} | | | | |")
        else:
            print(f"| {r['name']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['fwd_bwd_tflops']:.0f} | "
                  f"{r['out_err']:.3g} | {r['dq_err']:.3g} |")
    if args.out:
        from pathlib import Path

        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = f"flex_sweep-{args.tokens}-d{args.head_dim}-w{args.window}.json"
        (Path(args.out) / name).write_text(json.dumps({"args": vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
