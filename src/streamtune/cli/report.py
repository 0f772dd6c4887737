"""``streamtune report RUN [RUN2 ...] [--out DIR]``."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any, help_text: str) -> argparse.ArgumentParser:
    """Register the ``report`` subcommand."""
    parser = subparsers.add_parser(
        "report", help=help_text,
        description="Write report.html with plots (loss and eval loss, tokens/s, GPU peak, host-to-GPU GB/s) "
                    "as PNGs beside it, from each run's metrics.jsonl. Several runs are compared on each plot. "
                    "Plots need matplotlib (pip install 'streamtune[report]'); without it the page lists the metrics.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (output.dir of a run)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where report.html goes (default: the first RUN; give one when comparing runs)")
    parser.set_defaults(command="report")
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the report and say where it is. Returns the exit code."""
    from streamtune.report import write_report

    page = write_report(args.runs, args.out)
    print(str(page))
    return 0
