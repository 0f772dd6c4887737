"""``streamtune chat MODEL_OR_ADAPTER``: an interactive conversation, one line per user turn."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from streamtune.cli.infer_args import SOURCE_HELP, add_placement_args, add_sampling_args, options_from, sampling_from

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
HISTORY_TOKENS_ALLOWANCE = 4096


def add_parser(subparsers: Any, help_text: str) -> argparse.ArgumentParser:
    """Register the ``chat`` subcommand."""
    parser = subparsers.add_parser(
        "chat", help=help_text,
        description="Chat with a model: each line read from stdin is a user turn; the whole history goes "
                    "through the chat template. /reset clears the history, /exit (or end of input) ends.",
    )
    parser.add_argument("source", metavar="MODEL_OR_ADAPTER", help=SOURCE_HELP)
    parser.add_argument("--system", default=None, metavar="TEXT", help="optional system message")
    add_sampling_args(parser)
    add_placement_args(parser)
    parser.set_defaults(command="chat")
    return parser


def run(args: argparse.Namespace) -> int:
    """Read turns from stdin until /exit or EOF; print each reply. Returns the exit code."""
    from streamtune.infer import open_model

    sampling = sampling_from(args)
    interactive = sys.stdin.isatty()
    with open_model(args.source, options_from(args, HISTORY_TOKENS_ALLOWANCE + sampling.max_new_tokens)) as loaded:
        if interactive:
            print(f"chatting with {loaded.source.label} ({RESET_COMMAND} clears, /exit ends)", file=sys.stderr)
        chat_loop(loaded, sys.stdin, sys.stdout, sampling, args.system, interactive)
    return 0


def chat_loop(loaded: Any, lines: Any, out: Any, sampling: Any, system: str | None, interactive: bool) -> list[dict]:
    """The conversation: returns the history (user and assistant turns) when input ends."""
    from streamtune.infer import generate

    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line:
            break
        text = line.strip()
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            history = list(start)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = generate(loaded, history, sampling)
        history.append({"role": "assistant", "content": reply})
        print(reply, file=out, flush=True)
    return history
