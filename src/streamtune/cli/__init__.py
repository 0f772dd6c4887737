"""The ``streamtune`` command: parsing and dispatch only.

Each subcommand lives in ``streamtune.cli.<name>`` with ``add_parser(subparsers)`` and
``run(args) -> int``; modules are imported lazily so ``streamtune --help`` stays fast.
Exit codes: 0 success, 2 bad config or input, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from streamtune import __version__
from streamtune.errors import StreamtuneError

SUBCOMMANDS = {
    "train": "fine-tune a model with LoRA (resident or streamed)",
    "plan": "will it fit, where does each layer live, how fast will a step be",
    "bench": "measure this machine (link) or time a streamed step against baselines",
    "doctor": "check the installed stock HF stack against the known Gemma4 bugs",
    "merge": "merge a LoRA adapter into its base model and save a HF checkpoint",
    "generate": "generate a reply to a prompt with a model, adapter or run checkpoint (streamed as in training)",
    "chat": "chat with a model, adapter or run checkpoint (one stdin line per turn)",
    "eval": "loss and perplexity of a model, adapter or run on a data file",
    "report": "write the HTML report (plots of loss, tokens/s, GPU peak, H2D GB/s) of one or more runs",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamtune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"streamtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = _module(name)
        if module is None:
            continue
        module.add_parser(sub, help_text)
    return parser


def _module(name: str):
    try:
        return importlib.import_module(f"streamtune.cli.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"streamtune.cli.{name}":
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``streamtune`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(_module(args.command).run(args) or 0)
    except StreamtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
