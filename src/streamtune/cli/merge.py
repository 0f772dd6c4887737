"""``streamtune merge ADAPTER_DIR --out DIR``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any, help_text: str) -> argparse.ArgumentParser:
    """Register the ``merge`` subcommand."""
    parser = subparsers.add_parser(
        "merge", help=help_text,
        description="Merge a LoRA adapter into its base model and write a Hugging Face checkpoint "
                    "(config.json, *.safetensors, tokenizer).",
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="PEFT adapter directory, e.g. runs/quickstart/adapter")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory of the merged checkpoint")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype of the merged weights (default: the dtype the adapter trained in)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    parser.set_defaults(command="merge")
    return parser


def run(args: argparse.Namespace) -> int:
    """Merge and report where the checkpoint went. Returns the exit code."""
    from streamtune.lora import merge

    out_dir = merge(args.adapter_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged checkpoint: {out_dir}", file=sys.stderr)
    return 0
