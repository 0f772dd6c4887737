"""Run reports: ``RUN/report.html`` with PNG plots beside it, from ``RUN/metrics.jsonl``.

Public API::

    write_report(["runs/a"])                      # runs/a/report.html (+ report-*.png)
    write_report(["runs/a", "runs/b"], "cmp")     # both runs on each plot, in cmp/report.html
    refresh_run_report("runs/a")                  # the training loop's call: never raises

Without matplotlib the page still lists the metrics as a table and says how to get plots.
Nothing here is needed by the training loop to make progress.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from streamtune.errors import InputError

REPORT_FILE = "report.html"
_warned: set[str] = set()


def run_summary(run_dir: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Model, data, steps, first/last loss, best eval loss, mean tok/s and GPU peak of a run."""
    import yaml

    config: dict[str, Any] = {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError:
            config = {}
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    evals = [r["eval_loss"] for r in records if isinstance(r.get("eval_loss"), (int, float))]
    tok_s = [r["tok_s"] for r in records if isinstance(r.get("tok_s"), (int, float))]
    peaks = [r["gpu_peak_bytes"] for r in records if isinstance(r.get("gpu_peak_bytes"), (int, float))]
    data = config.get("data") or {}
    return {
        "model": (config.get("model") or {}).get("name", ""),
        "data": f"{data.get('path', '')} ({data.get('format', '')})" if data else "",
        "steps": f"{records[-1]['step']}/{(config.get('train') or {}).get('max_steps', '?')}" if records else "0",
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "best_eval_loss": min(evals) if evals else None,
        "mean_tok_s": sum(tok_s) / len(tok_s) if tok_s else None,
        "gpu_peak_bytes": max(peaks) if peaks and max(peaks) > 0 else None,
    }


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [d.resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in run_dirs]


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write ``report.html`` (and its PNGs) for one run, or for several compared on each plot.

    Args:
        run_dirs: run directories (each with ``metrics.jsonl``).
        out_dir: where the page goes; default: the first run's directory.

    Returns:
        The path of ``report.html``.

    Raises:
        InputError: a run directory does not exist or holds no ``metrics.jsonl``.
    """
    from streamtune.report.html import NO_PLOTS_HINT, render
    from streamtune.report.plots import draw_all, have_matplotlib
    from streamtune.train.metrics import METRICS_FILE, read_metrics

    paths = [Path(d) for d in run_dirs]
    if not paths:
        raise InputError("RUN: give at least one run directory")
    for path in paths:
        if not (path / METRICS_FILE).is_file():
            raise InputError(f"RUN: {str(path)!r} holds no {METRICS_FILE}; pass a run directory (output.dir of a run)")
    out = Path(out_dir) if out_dir is not None else paths[0]
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for label, path in zip(_labels(paths), paths):
        records = read_metrics(path)
        runs[label] = {"summary": run_summary(path, records), "records": records}
    images, note = [], None
    if have_matplotlib():
        images = draw_all({label: run["records"] for label, run in runs.items()}, out)
    else:
        note = f"Plots need matplotlib: {NO_PLOTS_HINT}, then run: streamtune report {' '.join(map(str, paths))}"
    title = "streamtune report: " + " vs ".join(runs)
    page = out / REPORT_FILE
    tmp = page.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text(render(title, runs, images, note), encoding="utf-8")
    tmp.replace(page)
    return page


def refresh_run_report(run_dir: str | Path) -> Path | None:
    """Rewrite ``RUN/report.html``; on any failure warn once per run and return None (never raises)."""
    try:
        return write_report([run_dir])
    except Exception as exc:  # a report must never stop training
        key = str(run_dir)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"could not write {Path(run_dir) / REPORT_FILE}: {type(exc).__name__}: {exc} "
                          "(training goes on; `streamtune report RUN` retries)", stacklevel=2)
            print(f"warning: could not write the run report: {exc}", file=sys.stderr)
        return None
