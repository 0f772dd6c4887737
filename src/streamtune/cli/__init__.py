"""The ``streamtune`` command: parsing and dispatch only.

Each subcommand lives in ``streamtune.cli.<name>`` with ``add_parser(subparsers)`` and
``run(args) -> int``; modules are imported lazily so ``streamtune --help`` stays fast.
Exit codes: 0 success, 2 bad config or input, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Any

from streamtune import __version__
from streamtune.errors import StreamtuneError

SUBCOMMANDS = {
    "train": "fine-tune a model with LoRA as a YAML config says; layers that do not fit on the GPU stream from RAM",
    "plan": "before loading anything: will a run fit, where does each layer live, how fast will a step be",
    "bench": "measure this machine's host-to-GPU copy speed (--link), or time a streamed step against baselines",
    "doctor": "check the installed torch/transformers/peft/accelerate/bitsandbytes against known Gemma4 bugs",
    "merge": "merge a trained LoRA adapter into its base model and save a plain HF checkpoint",
    "generate": "generate a reply to a prompt with a model, adapter or run checkpoint (streamed as in training)",
    "chat": "chat with a model, adapter or run checkpoint (one stdin line per turn)",
    "eval": "loss and perplexity of a model, adapter or run on a data file",
    "report": "write the HTML report (plots of loss, tokens/s, GPU peak, H2D GB/s) of one or more runs",
}


# One example per command for ``streamtune --help`` (shown for the commands that are installed).
EXAMPLES = {
    "train": "streamtune train examples/quickstart.yaml train.max_steps=32   # any config key as section.key=value",
    "plan": "streamtune plan gemma4-26b-a4b --gpu-memory 24GiB --codec int8   # or a checkpoint directory",
    "bench": "streamtune bench --link                  # measure this machine's host-to-GPU copy speed",
    "doctor": "streamtune doctor                        # which known stock-stack bugs bite here",
    "merge": "streamtune merge runs/quickstart/adapter --out runs/quickstart/merged",
    "generate": "streamtune generate runs/quickstart --prompt 'What is the capital of Germany?'",
    "chat": "streamtune chat runs/quickstart/adapter",
    "eval": "streamtune eval runs/quickstart --data examples/data/pirate_eval.jsonl",
    "report": "streamtune report runs/quickstart",
}
DESCRIPTION = """\
LoRA fine-tuning of language models bigger than your GPU: the frozen base weights stay in host RAM
(optionally int8/nf4) and stream to the GPU layer by layer, overlapped with compute. Models are stock
Hugging Face checkpoints (or presets); adapters are stock PEFT adapters.

Start with:  streamtune train examples/quickstart.yaml     (a real model on the CPU, about a minute and a half)
"""
# A command-line word that is a config override (``section.key=value``) rather than a file or option.
OVERRIDE_RE = re.compile(r"^[A-Za-z_][\w.]*=")


def _epilog(commands: list[str]) -> str:
    lines = ["examples:"] + [f"  {EXAMPLES[name]}" for name in commands if name in EXAMPLES]
    lines += ["", "`streamtune COMMAND --help` shows a command's options; `streamtune train --help` lists every config "
              "key.", "exit codes: 0 success, 1 runtime failure, 2 bad config or input, 130 interrupted."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamtune", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"streamtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    installed = []
    for name, help_text in SUBCOMMANDS.items():
        module = _module(name)
        if module is None:
            continue
        module.add_parser(sub, help_text)
        installed.append(name)
    parser.epilog = _epilog(installed)
    return parser


def is_override(word: str) -> bool:
    """Whether a command-line word is a ``section.key=value`` config override."""
    return bool(OVERRIDE_RE.match(word))


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, taking ``KEY=VALUE`` overrides wherever they stand (before or after options)."""
    args, extras = parser.parse_known_args(argv)
    overrides = [word for word in extras if is_override(word)]
    unknown = [word for word in extras if not is_override(word)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_option_hint(parser, args, unknown)}")
    if overrides:
        if not hasattr(args, "overrides"):
            parser.error(f"{args.command or 'streamtune'} takes no KEY=VALUE overrides: {' '.join(overrides)}")
        args.overrides = list(args.overrides) + overrides
    return args


def _option_hint(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> str:
    import difflib

    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = sub.choices.get(getattr(args, "command", None) or "") if sub else None
    options = [o for a in (command or parser)._actions for o in a.option_strings]
    for word in unknown:
        close = difflib.get_close_matches(word.split("=")[0], options, n=1, cutoff=0.6)
        if word.startswith("-") and close:
            return f" (did you mean {close[0]}?)"
    return ""


def _module(name: str):
    try:
        return importlib.import_module(f"streamtune.cli.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"streamtune.cli.{name}":
            return None
        raise


# bitsandbytes logs this on every import on a CPU with AVX512-BF16 when the optional ``kernels`` package is
# missing (peft imports bitsandbytes when it is installed); streamtune never uses that 4-bit CPU GEMM
_IRRELEVANT_LOGS = {"bitsandbytes.backends.cpu.ops": "gemm_4bit_forward from kernels-community"}


class _DropMessage:
    """A ``logging`` filter that drops the records whose message contains ``text``."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record: Any) -> bool:
        return self.text not in record.getMessage()


def quiet_irrelevant_logs() -> None:
    """Drop third-party log lines that advise about code paths streamtune never takes (idempotent)."""
    import logging

    for name, text in _IRRELEVANT_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``streamtune`` console script."""
    parser = build_parser()
    args = _parse(parser, argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    quiet_irrelevant_logs()
    try:
        return int(_module(args.command).run(args) or 0)
    except StreamtuneError as exc:
        print(f"{exc.label}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
