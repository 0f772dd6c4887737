"""Per-piece benchmarks of the fused RMSNorm and gated activation (used by fast_step.py, issue 12).

- ``norm``: the decoder's RMSNorms at ``--tokens`` on the preset's shapes, forward + backward: one
  hidden-size norm with a scale, one head-dim norm with a scale (q_norm) and one without (v_norm),
  stock ``Gemma4RMSNorm`` (or the model's norm class) vs :func:`streamtune.kernels.fused.fused_norm_forward`.
- ``act``: the dense MLP's gated activation ``act(gate) * up`` at ``--tokens`` x intermediate size,
  stock (the model's ``act_fn`` then ``*``) vs the compiled fused function.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable


def _norms(model: Any, tokens: int) -> list[tuple[Any, tuple[int, ...]]]:
    """(norm module, input shape) of the first decoder layer: input norm, q norm, v norm (where present)."""
    from streamtune.models import decoder

    layer = decoder(model).layers[0]
    attn = layer.self_attn
    config = decoder(model).config
    found = [(layer.input_layernorm, (1, tokens, config.hidden_size))]
    for name in ("q_norm", "v_norm"):
        if hasattr(attn, name):
            found.append((getattr(attn, name), (1, tokens, config.num_attention_heads, attn.head_dim)))
    return found


def piece_norm(args: argparse.Namespace, model: Any, timed: Callable, compare: Callable) -> dict[str, Any]:
    import torch

    from streamtune.kernels import calls, reset
    from streamtune.kernels.fused import fused_norm_forward, norm_convention

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(5)
    inputs = []
    for norm, shape in _norms(model, args.tokens):
        norm._streamtune_norm_offset = norm_convention(norm)
        x = torch.randn(shape, device=device, generator=gen).bfloat16().requires_grad_()
        inputs.append((norm, x))
    result: dict[str, Any] = {}
    for name in ("eager", "fast"):
        def step() -> Any:
            total = 0.0
            for norm, x in inputs:
                x.grad = None
                forward = fused_norm_forward if name == "fast" else type(norm).forward
                out = forward(norm, x)
                out.float().square().mean().backward()
                total += float(out.detach().float().square().mean())
            return total

        reset()
        seconds, loss = timed(step, args.warmup, args.repeats)
        result[name] = {"s": seconds, "loss": loss, "grad": torch.cat([x.grad.flatten() for _, x in inputs]),
                        "fused_calls": calls("fused_compiled"),
                        "shapes": [list(x.shape) for _, x in inputs]}
    return compare(result)


def piece_act(args: argparse.Namespace, model: Any, timed: Callable, compare: Callable) -> dict[str, Any]:
    import torch

    from streamtune.kernels import calls, reset
    from streamtune.kernels.fused import ACTIVATIONS, run_fused
    from streamtune.models import decoder

    mlp = decoder(model).layers[0].mlp
    text = model.config.get_text_config()
    act_name = ACTIVATIONS[getattr(text, "hidden_activation", None) or text.hidden_act]
    width = mlp.down_proj.get_base_layer().in_features if hasattr(mlp.down_proj, "get_base_layer") \
        else mlp.down_proj.in_features
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(6)
    gate = torch.randn(args.tokens, width, device=device, generator=gen).bfloat16().requires_grad_()
    up = torch.randn(args.tokens, width, device=device, generator=gen).bfloat16().requires_grad_()
    result: dict[str, Any] = {}
    for name in ("eager", "fast"):
        def step() -> Any:
            gate.grad = up.grad = None
            out = run_fused(act_name, gate, up) if name == "fast" else mlp.act_fn(gate) * up
            out.float().square().mean().backward()
            return float(out.detach().float().square().mean())

        reset()
        seconds, loss = timed(step, args.warmup, args.repeats)
        result[name] = {"s": seconds, "loss": loss, "grad": torch.cat([gate.grad.flatten(), up.grad.flatten()]),
                        "fused_calls": calls("fused_compiled"), "activation": act_name, "width": width}
    return compare(result)


def format_model_ablation(model_piece: dict[str, Any]) -> str:
    """Step ms, launches, peak and profile categories of each timed variant of the ``model`` piece."""
    timed = [(name, run) for name, run in model_piece.items()
             if isinstance(run, dict) and "profile" in run]
    if not timed:
        return ""
    categories = list(timed[0][1]["profile"]["ms"])
    lines = ["| model step | " + " | ".join(name for name, _ in timed) + " |", "|---" + "|---:" * len(timed) + "|"]
    lines.append("| step ms | " + " | ".join(f"{run['s'] * 1e3:.1f}" for _, run in timed) + " |")
    lines.append("| kernel launches | " + " | ".join(str(run["profile"]["launches"]) for _, run in timed) + " |")
    lines.append("| peak GiB | " + " | ".join(f"{run['peak_bytes'] / 2**30:.1f}" for _, run in timed) + " |")
    lines.append("| loss rel err vs eager | " + " | ".join(f"{run['loss_rel_err_vs_eager']:.1e}" for _, run in timed)
                 + " |")
    for category in categories:
        lines.append(f"| {category} ms | " + " | ".join(f"{run['profile']['ms'][category]:.1f}" for _, run in timed)
                     + " |")
    errors = [f"{name}: {run['error'][:200]}" for name, run in model_piece.items()
              if isinstance(run, dict) and "error" in run]
    return "\n".join(lines + errors)
