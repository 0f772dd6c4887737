"""``streamtune doctor``: the installed stock stack against the known Gemma4 bugs.

Exit code 0 whenever the checks ran, whatever reproduces; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from streamtune.errors import InputError


def add_parser(subparsers: Any, help_text: str) -> None:
    parser = subparsers.add_parser("doctor", help=help_text, description=help_text)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--markdown", metavar="FILE", help="also write a VALIDATION-STATUS markdown table to FILE")
    parser.add_argument("--only", metavar="ID,ID", help="run only these entries (e.g. P2,N1)")
    parser.add_argument("--apply", action="store_true",
                        help="apply the in-memory fixes first (shows each fix working; nothing on disk changes)")
    parser.set_defaults(command="doctor")


def _only(value: str | None) -> list[str] | None:
    if value is None:
        return None
    ids = [part.strip() for part in value.split(",") if part.strip()]
    if not ids:
        raise InputError("--only: give at least one id, e.g. --only P2,N1")
    return ids


def _check_markdown_path(value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        raise InputError(f"--markdown: {value!r} is a directory; give a file path such as VALIDATION-STATUS.md")
    if not path.parent.exists():
        raise InputError(f"--markdown: directory {str(path.parent)!r} does not exist; create it or pick another path")
    return path


class ProgressLines:
    """One stderr line as each reproducer starts and one as it ends (``[2/7] P2 ... reproduces (1.3 s)``).

    The stream is taken when the object is made: the reproducers run with stderr redirected.
    """

    def __init__(self, total: int | None, stream: Any = None):
        self.total, self.stream, self.done = total, stream or sys.stderr, 0

    def __call__(self, phase: str, entry: Any, outcome: Any, seconds: float) -> None:
        label = f"{entry.id} ({phase})" if phase != "stock" else entry.id
        if outcome is None:
            print(f"{self._counter(self.done + 1)} {label}: {entry.title} ...", file=self.stream, flush=True)
            return
        self.done += 1
        verdict = {True: "reproduces", False: "does not reproduce", None: "cannot test here"}[outcome.reproduces]
        print(f"{self._counter(self.done)} {label}: {verdict} ({seconds:.1f} s)", file=self.stream, flush=True)

    def _counter(self, index: int) -> str:
        return f"[{index}/{self.total}]" if self.total else f"[{index}]"


def collect(ids: list[str] | None, apply_fixes: bool = False, progress: Any = None) -> dict[str, Any]:
    """Everything the doctor reports, as one JSON-ready dict.

    ``progress`` (e.g. :class:`ProgressLines`) hears of each reproducer as it starts and ends.

    Raises:
        InputError: unknown id in ``ids``.
    """
    from streamtune import compat
    from streamtune.compat import system

    compat.select(ids)
    if apply_fixes:
        compat.apply(ids, progress)
    cuda = system.cuda_info()
    report = {
        "versions": compat.versions(),
        "host": system.host_info(),
        "cuda": cuda,
        "pinned_h2d_gbps": system.pinned_h2d_gbps() if cuda["available"] else None,
        "applied": compat.applied(),
        "fixes": [result.to_dict() for result in compat.check(ids, progress)],
    }
    return report


def _word(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "cannot test here"}[value]


def render_text(report: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items())
    host, cuda = report["host"], report["cuda"]
    lines = [f"stack: {versions}",
             f"host: {host['num_cpus']} CPUs, {host['ram_total_bytes'] / 2**30:.1f} GiB RAM "
             f"({host['ram_available_bytes'] / 2**30:.1f} GiB available)"]
    if cuda["available"]:
        names = "; ".join(f"{d['name']} {d['memory_bytes'] / 2**30:.0f} GiB" for d in cuda["devices"])
        lines.append(f"cuda: {cuda['torch_cuda']}, driver {cuda.get('driver')}, {names}")
        lines.append(f"pinned H2D: {report['pinned_h2d_gbps']:.1f} GB/s")
    else:
        lines.append("cuda: not available (GPU checks skipped)")
    lines.append("")
    lines.append(f"{'id':<4} {'reproduces':<17} {'fix':<5} {'applied':<7} title / reason")
    for row in report["fixes"]:
        lines.append(f"{row['id']:<4} {_word(row['reproduces']):<17} {'yes' if row['fix_available'] else 'no':<5} "
                     f"{'yes' if row['applied'] else 'no':<7} {row['title']}")
        lines.append(f"{'':<37}{row['reason']}")
        if row["reproduces_with_fix"] is not None:
            verdict = "still reproduces" if row["reproduces_with_fix"] else "does not reproduce"
            lines.append(f"{'':<37}with the fix applied: {verdict}")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items())
    cuda = report["cuda"]
    gpu = "; ".join(d["name"] for d in cuda.get("devices", [])) if cuda["available"] else "none"
    lines = ["# VALIDATION-STATUS", "", "Generated by `streamtune doctor --markdown` from its own run.", "",
             f"- stack: {versions}", f"- GPU: {gpu}", "",
             "| id | title | reproduces here | reason | fix available | applied | fixed with fix |",
             "|---|---|---|---|---|---|---|"]
    for row in report["fixes"]:
        with_fix = "" if row["reproduces_with_fix"] is None else ("no" if row["reproduces_with_fix"] else "yes")
        cells = [row["id"], row["title"], _word(row["reproduces"]), row["reason"],
                 "yes" if row["fix_available"] else "no", "yes" if row["applied"] else "no", with_fix]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    ids = _only(args.only)
    markdown_path = _check_markdown_path(args.markdown)
    from streamtune import compat

    # Without --apply, check() runs each selected reproducer once; with it, how many run depends on the outcomes.
    total = None if args.apply else len(compat.select(ids))
    report = collect(ids, apply_fixes=args.apply, progress=ProgressLines(total))
    if markdown_path is not None:
        markdown_path.write_text(render_markdown(report))
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0
