"""Arguments shared by ``generate``, ``chat`` and ``eval``: which model, where, and how it is placed."""

from __future__ import annotations

import argparse
from typing import Any

SOURCE_HELP = ("a preset (tiny-gemma4), a HF checkpoint directory, an adapter directory (RUN/adapter, "
               "RUN/checkpoints/step-N) or a run directory; an adapter's base model is found from its streamtune.json")


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --codec, --stream, --gpu-memory (default: as the run trained)."""
    group = parser.add_argument_group("placement (default: as the run trained)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="compute device (default auto)")
    group.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default=None,
                       help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    group.add_argument("--codec", choices=("bf16", "int8", "nf4"), default=None, help="codec of the frozen base weights")
    group.add_argument("--stream", choices=("auto", "all", "none"), default=None,
                       help="decoder layers streamed from host RAM (auto: the plan decides)")
    group.add_argument("--gpu-memory", default=None, metavar="SIZE", help="GPU memory to use, e.g. 24GiB")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --top-p, --top-k, --seed."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate (default 128)")
    group.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default); > 0 samples")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    group.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (0 = off)")
    group.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")


def options_from(args: argparse.Namespace, max_tokens: int) -> Any:
    """:class:`~streamtune.infer.InferenceOptions` from the parsed placement arguments."""
    from streamtune.infer import InferenceOptions

    return InferenceOptions(device=args.device, dtype=args.dtype, codec=args.codec, stream=args.stream,
                            gpu_budget=args.gpu_memory, max_tokens=max_tokens)


def sampling_from(args: argparse.Namespace) -> Any:
    """:class:`~streamtune.infer.SamplingOptions`, checked before any model loads.

    Raises:
        InputError: a sampling value is out of range.
    """
    from streamtune.infer import SamplingOptions

    sampling = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    sampling.check()
    return sampling
