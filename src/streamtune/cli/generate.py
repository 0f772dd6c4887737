"""``streamtune generate MODEL_OR_ADAPTER --prompt TEXT``."""

from __future__ import annotations

import argparse
from typing import Any

from streamtune.cli.infer_args import SOURCE_HELP, add_placement_args, add_sampling_args, options_from, sampling_from

PROMPT_TOKENS_ALLOWANCE = 1024


def add_parser(subparsers: Any, help_text: str) -> argparse.ArgumentParser:
    """Register the ``generate`` subcommand."""
    parser = subparsers.add_parser(
        "generate", help=help_text,
        description="Generate a reply to one prompt (through the tokenizer's chat template when it has one) "
                    "on the streaming engine, placed as in training. The text goes to stdout.",
    )
    parser.add_argument("source", metavar="MODEL_OR_ADAPTER", help=SOURCE_HELP)
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the user message")
    parser.add_argument("--system", default=None, metavar="TEXT", help="optional system message")
    add_sampling_args(parser)
    add_placement_args(parser)
    parser.set_defaults(command="generate")
    return parser


def run(args: argparse.Namespace) -> int:
    """Open the model, generate, print. Returns the exit code."""
    from streamtune.errors import InputError
    from streamtune.infer import generate, open_model

    sampling = sampling_from(args)
    if not args.prompt.strip():
        raise InputError("--prompt: empty prompt; give some text")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    with open_model(args.source, options_from(args, PROMPT_TOKENS_ALLOWANCE + sampling.max_new_tokens)) as loaded:
        print(generate(loaded, messages, sampling), flush=True)
    return 0
