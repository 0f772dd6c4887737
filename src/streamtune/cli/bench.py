"""``streamtune bench``: measure this machine's link, or time a streamed step against baselines."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, help_text: str) -> None:
    from streamtune.bench.run import add_arguments

    parser = sub.add_parser("bench", help=help_text, description=help_text)
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from streamtune.bench.run import run as run_bench, run_child

    return run_child(args) if args.child else run_bench(args)
