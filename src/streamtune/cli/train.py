"""``streamtune train CONFIG [key=value ...] [--resume]`` (overrides may stand anywhere on the line)."""

from __future__ import annotations

import argparse
import os
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
                        help="dotted overrides, e.g. train.max_steps=200 lora.targets=[q_proj,v_proj]; they may "
                             "stand anywhere on the line, before or after the options")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output.dir from its latest checkpoint (CONFIG may be the run's "
                             "own config.yaml, from any directory)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="cache the packed (encoded) layers of a checkpoint directory in DIR; the next run "
                             "reads them instead of the shards (same as memory.cache_dir=DIR)")
    parser.set_defaults(command="train")
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the config, train, print a summary. Returns the exit code."""
    from streamtune.config import load

    config_path, overrides = _config_and_overrides(args.config, list(args.overrides))
    if getattr(args, "cache_dir", None):
        overrides.append(f"memory.cache_dir={args.cache_dir}")
    cfg = load(config_path, overrides)
    from streamtune.train import train

    # the process ends here: no decoding of the whole base back into host RAM
    result = train(cfg, resume=args.resume, resume_command=resume_command(args), keep_model=False)
    if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun only rank 0 reports
        _summary(result)
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run from its latest checkpoint."""
    import shlex

    words = ["streamtune", "train", args.config, *args.overrides]
    if getattr(args, "cache_dir", None):
        words += ["--cache-dir", args.cache_dir]
    return shlex.join([*words, "--resume"])


def _config_and_overrides(first: str, rest: list[str]) -> tuple[str, list[str]]:
    """The CONFIG file and the overrides, whichever order the positional words came in.

    Raises:
        InputError: no CONFIG, or more than one word that is not an override.
    """
    from pathlib import Path

    from streamtune.cli import is_override
    from streamtune.errors import InputError

    words = [first, *rest]
    files = [w for w in words if not is_override(w) or Path(w).is_file()]
    if len(files) != 1:
        what = "no CONFIG file" if not files else f"several CONFIG files ({', '.join(files)})"
        raise InputError(f"train: {what}; give one YAML file and any section.key=value overrides, e.g. "
                         "streamtune train examples/quickstart.yaml train.max_steps=50")
    return files[0], [w for w in words if w != files[0]]


def _summary(result: Any) -> None:
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        print(f"steps {result.start_step + 1}-{result.steps}: loss {first:.4f} -> {last:.4f} "
              f"in {result.wall_s:.1f} s", file=sys.stderr)
    if result.eval_losses:
        print(f"eval loss {result.eval_losses[-1]:.4f}", file=sys.stderr)
    print(f"adapter: {result.adapter_dir}", file=sys.stderr)
    print(f"run: {result.run_dir} (config.yaml, metrics.jsonl, checkpoints/)", file=sys.stderr)
