"""``streamtune eval RUN_OR_ADAPTER --data FILE``: loss and perplexity on a data file."""

from __future__ import annotations

import argparse
import json
from typing import Any

from streamtune.cli.infer_args import SOURCE_HELP, add_placement_args, options_from


def add_parser(subparsers: Any, help_text: str) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval", help=help_text,
        description="Mean next-token loss and perplexity of a model on a data file, with the training data "
                    "pipeline (the run's format, seq_len and response-only labels unless given).",
    )
    parser.add_argument("source", metavar="RUN_OR_ADAPTER", help=SOURCE_HELP)
    parser.add_argument("--data", required=True, metavar="FILE", help="a .jsonl or .parquet file")
    parser.add_argument("--format", default=None, choices=("auto", "text", "alpaca", "messages"),
                        help="record format (default: the run's data.format)")
    parser.add_argument("--seq-len", type=int, default=None, metavar="N", help="tokens per sequence (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="sequences per forward (default 1)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_placement_args(parser)
    parser.set_defaults(command="eval")
    return parser


def run(args: argparse.Namespace) -> int:
    """Open the model, evaluate, print. Returns the exit code."""
    from pathlib import Path

    from streamtune.errors import InputError
    from streamtune.infer import evaluate_file, open_model

    if not Path(args.data).is_file():
        raise InputError(f"--data: {args.data!r} does not exist; pass a .jsonl or .parquet file")
    if args.seq_len is not None and args.seq_len < 8:
        raise InputError(f"--seq-len: {args.seq_len} must be >= 8")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: {args.batch_size} must be >= 1")
    with open_model(args.source, options_from(args, args.seq_len or 512)) as loaded:
        result = evaluate_file(loaded, args.data, fmt=args.format, seq_len=args.seq_len, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(vars(result)))
    else:
        print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
              f"({result.loss_tokens} tokens, {result.num_batches} batches)")
    return 0
