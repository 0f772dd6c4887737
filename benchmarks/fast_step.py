"""Fast step vs stock step, piece by piece and for a cut 26B model: numbers and times (issue 12).

Each piece runs the stock (eager) path and the fast path of ``streamtune.kernels`` on the same
inputs, checks the fast path against the stock one (loss relative error, per-tensor gradient
cosine) and times forward + backward with CUDA synchronisation (median of ``--repeats`` after
``--warmup`` runs, so compilation is not timed):

- ``loss``: final hidden states [tokens, hidden] -> LM head -> soft-cap -> CE, stock chunked
  (``train.loss_chunk_tokens``) vs the fused linear-CE; also the peak memory above the inputs.
- ``lora``: one LoRA ``q_proj`` (r=16) at ``--tokens``, PEFT fp32 adapters vs compute dtype.
- ``attn-sliding`` / ``attn-full``: one attention layer of the preset, transformers' SDPA with the
  masks it builds vs FlexAttention with block masks, on packed samples (``--doc-tokens`` each).
- ``norm`` / ``act``: the RMSNorms (hidden, q, v) and the gated activation of one layer at
  ``--tokens``, stock vs the compiled fused kernels (see fused_pieces.py).
- ``model``: the preset cut to ``--num-layers`` layers (5 sliding + 1 full for 6), random bf16
  weights, resident, LoRA r=16 on attention + dense MLP, HF non-reentrant gradient checkpointing:
  ``train.kernels=eager`` vs ``auto`` (loss, gradient cosine per LoRA tensor, step time, peak,
  kernel launches and the profile categories of notes/profile-categories.md); timed and profiled
  too: ``fast-nofused`` (auto without fused norms/activations) and ``fast-compiled`` (auto plus
  regional compile of every decoder layer, ``train.compile_layers``).
- ``experts``: one experts module of the preset (26B: 128 experts, top-8) with expert LoRA
  (``--expert-rank``) at each ``--expert-tokens``: PEFT ``target_parameters`` vs
  :mod:`streamtune.kernels.experts`; time, peak, host syncs (benchmarks/fast_step_experts.py).

Usage (on a GPU): python benchmarks/fast_step.py --out benchmarks/results/fast_step.json
Fused norms / activations / regional compile only (about 5 minutes on an H200):
    python benchmarks/fast_step.py --pieces norm,act,model --out benchmarks/results/fast_step-fused.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import torch

import fused_pieces  # benchmarks/ is on sys.path when this file runs as a script
from random_weights import attach_random_lora, condition_fill_

LAUNCH = re.compile(r"cudaLaunchKernel|cuLaunchKernel|cudaGraphLaunch")
CATEGORIES = (
    ("attention", r"flash|fmha|attention|attn|softmax|efficient"),
    ("gemm", r"gemm|sm90|cutlass|matmul|xmma|cublas|grouped|nvjet"),
    ("routing/index", r"index|scatter|gather|nonzero|sort|histc|cumsum|topk|where|one_hot"),
    ("memcpy/memset", r"memcpy|memset"),
    ("reduce/norm", r"reduce|sum|norm|mean"),
)


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``fn()`` and its last result."""
    out = None
    times = []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def piece_loss(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    from streamtune.kernels import calls, reset, select_for_device
    from streamtune.train.loss import chunked_lm_loss_sum

    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(1, args.tokens, config.hidden_size, device="cuda", generator=gen)).bfloat16()
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(head.weight, std=0.02, generator=gen)
    head.weight.requires_grad_(False)
    labels = torch.randint(0, config.vocab_size, (1, args.tokens), device="cuda", generator=gen)
    softcap = config.final_logit_softcapping
    choice = select_for_device("auto", torch.device("cuda"), torch.bfloat16)
    result: dict[str, Any] = {}
    for name, kernels in (("eager", None), ("fast", choice)):
        h = hidden.clone().requires_grad_()

        def step() -> Any:
            h.grad = None
            loss = chunked_lm_loss_sum(h, labels, head, softcap, args.loss_chunk_tokens, kernels)
            loss.backward()
            return loss.detach()

        reset()
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        seconds, loss = timed(step, args.warmup, args.repeats)
        result[name] = {"s": seconds, "loss": float(loss), "grad": h.grad.clone(),
                        "peak_extra_bytes": torch.cuda.max_memory_allocated() - base,
                        "fused_calls": calls("fused_linear_ce")}
    return _compare(result)


def piece_lora(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    from streamtune.kernels import calls, reset
    from streamtune.kernels.lora import restore_stock_lora, use_compute_dtype_lora

    layer = _decoder(model).layers[0].self_attn.q_proj
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, args.tokens, layer.in_features, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight_a = layer.lora_A["default"].weight
    result: dict[str, Any] = {}
    for name in ("eager", "fast"):
        if name == "fast":
            use_compute_dtype_lora(layer)

        def step() -> Any:
            weight_a.grad = None
            out = layer(x)
            out.float().square().mean().backward()
            return out.detach().float().square().mean()

        reset()
        seconds, loss = timed(step, args.warmup, args.repeats)
        result[name] = {"s": seconds, "loss": float(loss), "grad": weight_a.grad.clone(),
                        "lora_calls": calls("lora_compute_dtype")}
    restore_stock_lora(layer)
    return _compare(result)


def piece_attention(args: argparse.Namespace, model: Any, kind: str) -> dict[str, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from streamtune.kernels import calls, reset, select_for_device
    from streamtune.kernels.attention import FLEX_NAME, _STATE, flex_attention_forward, register_flex

    layers = _decoder(model).layers
    config = _decoder(model).config
    index = next(i for i, t in enumerate(config.layer_types) if t == kind)
    module = layers[index].self_attn
    heads = config.num_attention_heads
    full = kind == "full_attention"
    head_dim = module.head_dim
    kv_heads = module.k_proj.get_base_layer().out_features // head_dim
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, heads, args.tokens, head_dim, device="cuda", generator=gen).bfloat16()
    k = torch.randn(1, kv_heads, args.tokens, head_dim, device="cuda", generator=gen).bfloat16()
    v = torch.randn(1, kv_heads, args.tokens, head_dim, device="cuda", generator=gen).bfloat16()
    positions = torch.arange(args.tokens, device="cuda") % args.doc_tokens
    embeds = torch.zeros(1, args.tokens, 8, device="cuda", dtype=torch.bfloat16)
    make = create_causal_mask if full else create_sliding_window_causal_mask
    register_flex()
    _STATE["choice"] = select_for_device("auto", torch.device("cuda"), torch.bfloat16)
    result: dict[str, Any] = {}
    for name, impl, fn in (("eager", "sdpa", sdpa_attention_forward), ("fast", FLEX_NAME, flex_attention_forward)):
        previous = config._attn_implementation
        config._attn_implementation = impl
        mask = _make_mask(make, config, embeds, positions[None])
        config._attn_implementation = previous
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))

        def step() -> Any:
            for t in (qs, ks, vs):
                t.grad = None
            out, _ = fn(module, qs, ks, vs, mask, dropout=0.0, scaling=module.scaling,
                        sliding_window=None if full else config.sliding_window)
            out.float().square().mean().backward()
            return out.detach().float().square().mean()

        reset()
        seconds, loss = timed(step, args.warmup, args.repeats)
        result[name] = {"s": seconds, "loss": float(loss), "grad": torch.cat([t.grad.flatten() for t in (qs, ks, vs)]),
                        "flex_calls": calls("flex_attention"), "head_dim": head_dim}
    return _compare(result)


VARIANTS = {  # name -> fast pieces on (lora_compute_dtype, fused_linear_ce, flex_attention, fused_norm_act,
    #                                  compile_layers)
    "fast": (True, True, True, True, False), "fast-nofused": (True, True, True, False, False),
    "fast-compiled": (True, True, True, True, True), "lora-only": (True, False, False, False, False),
    "loss-only": (False, True, False, False, False), "flex-only": (False, False, True, False, False),
    "fused-only": (False, False, False, True, False),
}
TIMED_VARIANTS = ("fast", "fast-nofused", "fast-compiled")
COUNTED_CALLS = ("lora_compute_dtype", "fused_linear_ce", "flex_attention", "rms_norm_scaled", "rms_norm_plain",
                 "fused_compiled", "compiled_layer")


def _set_variant(model: Any, pieces: tuple[bool, ...] | None) -> Any:
    """Restore the stock model, then apply the chosen fast pieces; returns the KernelChoice (None: stock)."""
    import dataclasses

    from streamtune.kernels import apply_kernels, select_for_device
    from streamtune.kernels.attention import restore_attention
    from streamtune.kernels.fused import restore_stock_norms_and_activation
    from streamtune.kernels.lora import restore_stock_lora
    from streamtune.kernels.regional import restore_layers

    restore_stock_lora(model)
    restore_attention(model, "sdpa")
    restore_stock_norms_and_activation(model)
    restore_layers(_decoder(model).layers)
    if pieces is None:
        return None
    pieces = (*pieces, False, False)[:5]
    choice = select_for_device("auto", torch.device("cuda"), torch.bfloat16)
    choice = dataclasses.replace(choice, lora_compute_dtype=pieces[0], fused_linear_ce=pieces[1], flex_attention=pieces[2],
                                 fused_norm_act=pieces[3], compile_layers=pieces[4])
    apply_kernels(model, choice)
    return choice


def _model_run(args: argparse.Namespace, model: Any, adapter: Any, batch: dict, kernels: Any, timing: bool) -> dict:
    from streamtune.kernels import calls, reset
    from streamtune.train.loss import count_valid_tokens, lm_loss_sum

    def step() -> Any:
        model.zero_grad(set_to_none=True)
        loss = lm_loss_sum(model, adapter, batch, args.loss_chunk_tokens, kernels) / count_valid_tokens(batch["labels"])
        loss.backward()
        return loss.detach()

    reset()
    loss = step()
    out = {"loss": float(loss), "calls": {k: calls(k) for k in COUNTED_CALLS},
           "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}}
    if timing:
        torch.cuda.reset_peak_memory_stats()
        out["s"], _ = timed(step, args.warmup, args.repeats)
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["profile"] = _profile(step)
    return out


def piece_model(args: argparse.Namespace, model: Any, adapter: Any) -> dict[str, Any]:
    """Eager vs fast (and one piece at a time); every bf16 run also against an fp32 eager reference."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (1, args.tokens), generator=gen).cuda()
    positions = (torch.arange(args.tokens) % args.doc_tokens)[None].cuda()
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}
    runs = {"eager": _model_run(args, model, adapter, batch, _set_variant(model, None), True)}
    errors: dict[str, str] = {}
    for name, pieces in VARIANTS.items():
        try:
            runs[name] = _model_run(args, model, adapter, batch, _set_variant(model, pieces), name in TIMED_VARIANTS)
        except Exception as exc:  # one failing variant (e.g. a compile error) must not hide the others
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"[:1500]
    _set_variant(model, None)
    for p in model.parameters():  # bf16 -> fp32 is exact: the same weights, an fp32 eager reference
        if not p.requires_grad:
            p.data = p.data.float()
    reference = _model_run(args, model, adapter, batch, None, False)
    summary: dict[str, Any] = {}
    eager_grads = runs["eager"]["grads"]
    for name, run in runs.items():
        grads = run.pop("grads")
        vs_eager = {n: cosine(g, eager_grads[n]) for n, g in grads.items()}
        vs_ref = {n: cosine(g, reference["grads"][n]) for n, g in grads.items()}
        run["loss_rel_err_vs_fp32"] = rel(run["loss"], reference["loss"])
        run["loss_rel_err_vs_eager"] = rel(run["loss"], runs["eager"]["loss"])
        run["grad_cosine_min_vs_eager"] = min(vs_eager.values())
        run["grad_cosine_mean_vs_eager"] = statistics.mean(vs_eager.values())
        run["grad_cosine_min_vs_fp32"] = min(vs_ref.values())
        run["grad_cosine_mean_vs_fp32"] = statistics.mean(vs_ref.values())
        run["grad_cosine_min_tensor_vs_fp32"] = min(vs_ref, key=vs_ref.get)
        summary[name] = run
    summary.update({name: {"error": error} for name, error in errors.items()})
    eager, fast = summary["eager"], summary["fast"]
    return {**summary, "fp32_loss": reference["loss"], "loss_rel_err": fast["loss_rel_err_vs_eager"],
            "grad_cosine_min": fast["grad_cosine_min_vs_eager"], "speedup": eager["s"] / fast["s"]}


FP32_FLEX_OPTIONS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16,
                     "num_stages": 1, "num_warps": 4}


def piece_model_fp32(args: argparse.Namespace, model: Any, adapter: Any) -> dict[str, Any]:
    """The same model in fp32 (exact copy of the bf16 weights): eager vs every fast piece, numerics only.

    In bf16 a random-weight model's LoRA gradients are dominated by rounding (the ``model`` piece
    shows the stock bf16 path itself far from the fp32 gradients), so the logic of the fast path
    (FlexAttention backward, packed masks, recompute, fused loss, LoRA form) is checked here in fp32.
    """
    import dataclasses

    from streamtune.kernels import apply_kernels, select_for_device

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (1, args.tokens), generator=gen).cuda()
    positions = (torch.arange(args.tokens) % args.doc_tokens)[None].cuda()
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}
    _set_variant(model, None)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.float()
    eager = _model_run(args, model, adapter, batch, None, False)
    out: dict[str, Any] = {"eager_loss": eager["loss"]}
    choice = select_for_device("auto", torch.device("cuda"), torch.bfloat16)
    for name, pieces in (("lora+loss", (True, True, False)), ("fast", (True, True, True))):
        _set_variant(model, None)
        kernels = dataclasses.replace(choice, lora_compute_dtype=pieces[0], fused_linear_ce=pieces[1],
                                      flex_attention=pieces[2], flex_options={512: FP32_FLEX_OPTIONS},
                                      compile_layers=False)  # only the pieces named; compiled layers are on by default
        apply_kernels(model, kernels)
        try:
            run = _model_run(args, model, adapter, batch, kernels, False)
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
            continue
        cos = {n: cosine(g, eager["grads"][n]) for n, g in run["grads"].items()}
        out[name] = {"loss": run["loss"], "loss_rel_err": rel(run["loss"], eager["loss"]), "calls": run["calls"],
                     "grad_cosine_min": min(cos.values()), "grad_cosine_min_tensor": min(cos, key=cos.get),
                     "grad_cosine_mean": statistics.mean(cos.values())}
    fast = {**out.get("fast", {}), "s": float("nan")}
    return {**out, "eager": {"s": float("nan"), "loss": eager["loss"]}, "fast": fast,
            "loss_rel_err": fast.get("loss_rel_err", float("nan")),
            "grad_cosine_min": fast.get("grad_cosine_min", float("nan")), "speedup": float("nan")}


def categorise(prof: Any) -> dict[str, Any]:
    """Kernel ms per category of notes/profile-categories.md, launches, top kernels, synchronising runtime calls."""
    from torch.autograd import DeviceType

    totals = {name: 0.0 for name, _ in CATEGORIES}
    totals["elementwise/other"] = 0.0
    kernels = []
    launches, syncs = 0, {}
    for evt in prof.key_averages():
        name = evt.key
        if LAUNCH.search(name):
            launches += evt.count
        if "Synchronize" in name or name in ("cudaMemcpy", "cudaMemcpyAsync"):
            syncs[name] = syncs.get(name, 0) + evt.count
        device_us = getattr(evt, "self_device_time_total", 0) or 0
        # kernels only: Inductor's launcher records (named like their Triton kernel) and autograd functions carry
        # the device time of what they launched too, which counted every compiled kernel twice (the 2026-11-30
        # table's fast column)
        # "## Call CompiledFxGraph <hash> ##": a GPU-side range over a compiled graph's kernels (seen on the H200
        # from 2026-11-30 15:00 on), counted again by those kernels: 398 ms of a 26B step at 8192 tokens
        annotation = name.startswith("## ") and name.endswith(" ##")
        if device_us <= 0 or annotation or name.startswith("aten::") or evt.device_type != DeviceType.CUDA:
            continue
        category = next((c for c, rx in CATEGORIES if re.search(rx, name.lower())), "elementwise/other")
        totals[category] += device_us / 1e3
        kernels.append((device_us / 1e3, evt.count, name[:110]))
    kernels.sort(reverse=True)
    return {"category_ms": {k: round(v, 1) for k, v in totals.items()}, "kernel_ms": round(sum(totals.values()), 1),
            "launches": launches, "runtime_sync_calls": syncs, "top": kernels}


def _profile(step: Callable[[], Any]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    found = categorise(prof)
    return {"ms": {**found["category_ms"], "total": found["kernel_ms"]}, "launches": found["launches"]}


def _make_mask(make: Callable[..., Any], config: Any, embeds: Any, position_ids: Any) -> Any:
    """Call a transformers mask builder by keyword (its argument names changed across 5.x)."""
    import inspect

    names = inspect.signature(make).parameters
    values = {"config": config, "input_embeds": embeds, "inputs_embeds": embeds, "attention_mask": None,
              "cache": None, "past_key_values": None, "position_ids": position_ids,
              "cache_position": torch.arange(embeds.shape[1], device=embeds.device)}
    return make(**{k: v for k, v in values.items() if k in names})


def _compare(result: dict[str, Any]) -> dict[str, Any]:
    eager, fast = result["eager"], result["fast"]
    cos = cosine(fast.pop("grad"), eager.pop("grad"))
    return {"eager": eager, "fast": fast, "loss_rel_err": rel(fast["loss"], eager["loss"]), "grad_cosine": cos,
            "speedup": eager["s"] / fast["s"]}


def _preset(args: argparse.Namespace) -> Any:
    from streamtune.bench.common import bench_config

    return bench_config(args.preset, args.num_layers)


def _decoder(model: Any) -> Any:
    from streamtune.models import decoder

    return decoder(model)


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    from streamtune.bench.common import bench_config, build_random_model
    from streamtune.models import adapter_for

    config = bench_config(args.preset, args.num_layers)
    adapter = adapter_for(config)
    base = build_random_model(config)
    if getattr(args, "fill", "bench") == "conditioned":
        print(f"[fast_step] conditioned fill: {condition_fill_(base)} norm weights set", flush=True)
    model = attach_random_lora(base, adapter)
    model = model.cuda().train()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gemma4-26b-a4b")
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--doc-tokens", type=int, default=2048, help="packed sample length")
    parser.add_argument("--loss-chunk-tokens", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pieces", default="loss,lora,attn-sliding,attn-full,norm,act,model")
    parser.add_argument("--expert-tokens", default="2048,8192", help="token counts of the experts piece")
    parser.add_argument("--expert-rank", type=int, default=16)
    parser.add_argument("--fill", default="bench", choices=["bench", "conditioned"],
                        help="random weights: the benches' fill, or conditioned (random_weights.CONDITIONED_NORMS) for the bf16 "
                             "cosine")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    report: dict[str, Any] = {"device": props.name, "capability": list(torch.cuda.get_device_capability()),
                              "torch": torch.__version__, "args": vars(args), "pieces": {}}
    from fast_step_experts import piece_experts

    pieces = args.pieces.split(",")
    model, adapter = build(args) if set(pieces) - {"experts", "loss"} else (None, None)
    runners = {
        "loss": lambda: piece_loss(args, _decoder(model).config if model is not None else _preset(args)),
        "lora": lambda: piece_lora(args, model),
        "attn-sliding": lambda: piece_attention(args, model, "sliding_attention"),
        "attn-full": lambda: piece_attention(args, model, "full_attention"),
        "norm": lambda: fused_pieces.piece_norm(args, model, timed, _compare),
        "act": lambda: fused_pieces.piece_act(args, model, timed, _compare),
        "model": lambda: piece_model(args, model, adapter),
        "model-fp32": lambda: piece_model_fp32(args, model, adapter),
        "experts": lambda: piece_experts(args),
    }
    for name in pieces:
        started = time.perf_counter()
        try:
            report["pieces"][name] = runners[name]()
        except Exception as exc:  # one failing piece must not hide the others' numbers
            traceback.print_exc()
            report["pieces"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        report["pieces"][name]["wall_s"] = time.perf_counter() - started
        print(f"[fast_step] {name}: {json.dumps(report['pieces'][name], default=str)[:1500]}", flush=True)
        torch.cuda.empty_cache()
    print(format_table(report))
    if "error" not in report["pieces"].get("model", {"error": ""}):
        print(fused_pieces.format_model_ablation(report["pieces"]["model"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['device']} sm{''.join(map(str, report['capability']))} torch {report['torch']}",
             "| piece | eager ms | fast ms | speedup | loss rel err | grad cosine (min) |", "|---|---:|---:|---:|---:|---:|"]
    for name, piece in report["pieces"].items():
        if "error" in piece:
            lines.append(f"| {name} | error: {piece['error'][:80]} | | | | |")
            continue
        cos = piece.get("grad_cosine", piece.get("grad_cosine_min"))
        for run in piece.get("runs", [])[:-1]:  # the experts piece: one row per token count, the last below
            lines.append(f"| {name} {run['tokens']} | {run['eager']['s'] * 1e3:.1f} | {run['fast']['s'] * 1e3:.1f} | "
                         f"{run['speedup']:.2f}x | {run['out_rel_err']:.2e} | {run['grad_cosine_min']:.5f} |")
        if piece.get("runs"):
            name = f"{name} {piece['runs'][-1]['tokens']}"
        lines.append(f"| {name} | {piece['eager']['s'] * 1e3:.1f} | {piece['fast']['s'] * 1e3:.1f} | "
                     f"{piece['speedup']:.2f}x | {piece['loss_rel_err']:.2e} | {cos:.5f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
