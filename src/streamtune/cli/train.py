"""``streamtune train CONFIG [key=value ...] [--resume]``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EPILOG_HEAD = "config keys (set in CONFIG or as section.key=value overrides):"


def add_parser(subparsers: Any, help_text: str) -> argparse.ArgumentParser:
    """Register the ``train`` subcommand."""
    from streamtune.config import help_lines

    epilog = EPILOG_HEAD + "\n" + "\n".join(f"  {line}" for line in help_lines())
    parser = subparsers.add_parser(
        "train", help=help_text, description="Fine-tune a model with LoRA as CONFIG describes.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="YAML run config, e.g. examples/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.max_steps=200 lora.targets=[q_proj,v_proj]")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output.dir from its latest checkpoint")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="cache the packed (encoded) layers of a checkpoint directory in DIR; the next run "
                             "reads them instead of the shards (same as memory.cache_dir=DIR)")
    parser.set_defaults(command="train")
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the config, train, print a summary. Returns the exit code."""
    from streamtune.config import load

    overrides = list(args.overrides)
    if getattr(args, "cache_dir", None):
        overrides.append(f"memory.cache_dir={args.cache_dir}")
    cfg = load(args.config, overrides)
    from streamtune.train import train

    result = train(cfg, resume=args.resume, resume_command=resume_command(args))
    _summary(result)
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run from its latest checkpoint."""
    import shlex

    words = ["streamtune", "train", args.config, *args.overrides]
    if getattr(args, "cache_dir", None):
        words += ["--cache-dir", args.cache_dir]
    return shlex.join([*words, "--resume"])


def _summary(result: Any) -> None:
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        print(f"steps {result.start_step + 1}-{result.steps}: loss {first:.4f} -> {last:.4f} "
              f"in {result.wall_s:.1f} s", file=sys.stderr)
    if result.eval_losses:
        print(f"eval loss {result.eval_losses[-1]:.4f}", file=sys.stderr)
    print(f"adapter: {result.adapter_dir}", file=sys.stderr)
    print(f"run: {result.run_dir} (config.yaml, metrics.jsonl, checkpoints/)", file=sys.stderr)
