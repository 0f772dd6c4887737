"""``streamtune plan MODEL``: will it fit, where does each layer live, how fast will a step be."""

from __future__ import annotations

import argparse
import json

from streamtune.errors import InputError

EPILOG = """\
speeds: --gpu names a default profile; otherwise the measured ones cached in ~/.cache/streamtune/link.json
(by `streamtune bench --link`, or measured in a few seconds on a CUDA machine the first time a card is seen),
else the rtx4090 defaults. The plan's header names the profile it used. Exit code 2 when the run would not fit (the message says by how much and which
knob fixes it); with --json the JSON is printed first ("fits": false, "suggestions").
"""


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    from streamtune.models.presets import PRESETS
    from streamtune.plan.profiles import GPU_PROFILES

    p = subparsers.add_parser("plan", help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help=f"local HF checkpoint directory (config.json is read) or a preset: "
                                                  f"{', '.join(PRESETS)}")
    p.add_argument("--gpu-memory", help="GPU budget, e.g. 24GiB (default: the GPU profile's memory)")
    p.add_argument("--host-memory", help="host RAM budget, e.g. 64GiB (default: this machine's RAM)")
    p.add_argument("--codec", default="bf16", choices=("bf16", "int8", "nf4"), help="codec of frozen weights")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (batch_size x seq_len)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--lora-targets", default="auto",
                   help="auto, or comma-separated module names (e.g. q_proj,v_proj)")
    p.add_argument("--lora-target-parameters", default="",
                   help="comma-separated fused parameters, e.g. experts.gate_up_proj,experts.down_proj")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="plan without recomputation")
    p.add_argument("--stream", default="auto", choices=("auto", "all", "none"), help="streamed decoder layers")
    p.add_argument("--ring-slots", type=int, default=2, help="GPU ring slots for streamed layers")
    p.add_argument("--loss-chunk-tokens", type=int, default=1024, help="tokens per LM-head loss chunk")
    p.add_argument("--kernels", default="auto", choices=("auto", "eager"),
                   help="train.kernels: auto (fast path: fused loss, FlexAttention, compiled layers) or eager (stock HF)")
    p.add_argument("--gpu", metavar="NAME[,NAME]",
                   help=f"named speed profile instead of the measured one ({', '.join(sorted(GPU_PROFILES))}); two "
                        f"names (e.g. rtx4090,rtx-pro-2000) compare data parallel with a layer split over both GPUs")
    p.add_argument("--micro-batches", type=int, default=8,
                   help="with two GPUs: micro-batches of --tokens per optimizer step, over both (default 8)")
    p.add_argument("--dist-backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="with two GPUs: train.dist_backend of the data-parallel run (its host RAM and gradient sum)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(command="plan")
    return p


def _size(text: str | None, flag: str) -> int | None:
    from streamtune.config import parse_bytes

    if text is None:
        return None
    try:
        value = parse_bytes(text)
    except ValueError as exc:
        raise InputError(f"{flag}: {exc}") from exc
    if value <= 0:
        raise InputError(f"{flag}: {text!r} must be positive")
    return value


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _local_link(gpu: str | None) -> object:
    """Without ``--gpu``, on a CUDA machine: the profile of the card here (measured once, cached)."""
    import torch

    if gpu is not None or not torch.cuda.is_available():
        return None
    from streamtune.devices import detect_link_profile

    return detect_link_profile()


def run(args: argparse.Namespace) -> int:
    """Print the plan; exit 2 when it does not fit.

    Raises:
        InputError: bad option values, unknown model, or the run would not fit (table mode).
    """
    import psutil

    from streamtune.plan import format_table, make_plan

    host = _size(args.host_memory, "--host-memory")
    gpus = args.gpu.split(",") if args.gpu else []
    if len(gpus) > 1:
        return _run_multi(args, host if host is not None else int(psutil.virtual_memory().total))
    args.gpu = gpus[0].strip().lower() if gpus else None
    plan = make_plan(
        args.model, link=_local_link(args.gpu), codec=args.codec, tokens=args.tokens, lora_rank=args.lora_rank,
        lora_targets="auto" if args.lora_targets == "auto" else _names(args.lora_targets),
        lora_target_parameters=_names(args.lora_target_parameters),
        gradient_checkpointing=not args.no_gradient_checkpointing,
        gpu_budget_bytes=_size(args.gpu_memory, "--gpu-memory"),
        host_budget_bytes=host if host is not None else int(psutil.virtual_memory().total),
        stream=args.stream, ring_slots=args.ring_slots, loss_chunk_tokens=args.loss_chunk_tokens, gpu=args.gpu,
        kernels=args.kernels,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0 if plan.fits else 2
    plan.check()
    print(format_table(plan))
    return 0


def _run_multi(args: argparse.Namespace, host_bytes: int) -> int:
    from streamtune.plan.multi_gpu import format_multi, plan_gpus
    from streamtune.plan.profiles import resolve_gpu_list

    budgets = None
    if args.gpu_memory:
        budgets = [_size(part, "--gpu-memory") for part in args.gpu_memory.split(",")]
        if len(budgets) == 1:
            budgets = budgets * len(args.gpu.split(","))
    plan = plan_gpus(
        args.model, resolve_gpu_list(args.gpu), budgets, micro_batches=args.micro_batches, host_budget_bytes=host_bytes,
        codec=args.codec, tokens=args.tokens, lora_rank=args.lora_rank,
        lora_targets="auto" if args.lora_targets == "auto" else _names(args.lora_targets),
        lora_target_parameters=_names(args.lora_target_parameters),
        gradient_checkpointing=not args.no_gradient_checkpointing, ring_slots=args.ring_slots,
        loss_chunk_tokens=args.loss_chunk_tokens, kernels=args.kernels, dist_backend=args.dist_backend,
    )
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_multi(plan))
    return 0 if plan.choice != "none" else 2
