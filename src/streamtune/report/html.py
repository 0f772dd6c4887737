"""The HTML page of a report: what each run is, its final numbers, the plots, and the metrics table."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

TABLE_KEYS = ("step", "loss", "eval_loss", "lr", "tokens", "tok_s", "step_s", "grad_norm", "gpu_peak_bytes", "h2d_gbps")
MAX_TABLE_ROWS = 200
NO_PLOTS_HINT = "pip install 'streamtune[report]'"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
img { max-width: 100%; margin: 0.5em 0; border: 1px solid #eee; }
.note { background: #fff6d6; padding: 0.6em 1em; border-left: 4px solid #e0b000; }
"""


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key == "gpu_peak_bytes":
        return f"{value / 2**30:.2f} GiB"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def summary_rows(label: str, summary: dict[str, Any]) -> str:
    """One table row per run: what it trained and where it ended."""
    cells = [label, summary.get("model", ""), summary.get("data", ""), summary.get("steps", ""),
             summary.get("first_loss"), summary.get("last_loss"), summary.get("best_eval_loss"),
             summary.get("mean_tok_s"), summary.get("gpu_peak_bytes")]
    keys = ["", "", "", "", "loss", "loss", "loss", "tok_s", "gpu_peak_bytes"]
    tds = "".join(f'<td class="l">{html.escape(str(c))}</td>' if i < 3 else f"<td>{_fmt(k, c)}</td>"
                  for i, (c, k) in enumerate(zip(cells, keys)))
    return f"<tr>{tds}</tr>"


def metrics_table(records: list[dict[str, Any]]) -> str:
    """The step records as a table (every row when short, evenly thinned to ~200 rows otherwise)."""
    keys = [k for k in TABLE_KEYS if any(k in r for r in records)]
    stride = max(1, -(-len(records) // MAX_TABLE_ROWS))
    rows = [r for i, r in enumerate(records) if i % stride == 0 or i == len(records) - 1]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(k, r.get(k))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(title: str, runs: dict[str, dict[str, Any]], images: list[Path], plots_note: str | None) -> str:
    """The whole page. ``runs`` maps a label to ``{"summary": {...}, "records": [...]}``."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts.append("<table><tr><th class='l'>run</th><th class='l'>model</th><th class='l'>data</th><th>steps</th>"
                 "<th>first loss</th><th>last loss</th><th>best eval loss</th><th>mean tok/s</th><th>GPU peak</th></tr>")
    parts.extend(summary_rows(label, run["summary"]) for label, run in runs.items())
    parts.append("</table>")
    if plots_note:
        parts.append(f"<p class='note'>{html.escape(plots_note)}</p>")
    for image in images:
        parts.append(f"<img src='{html.escape(image.name)}' alt='{html.escape(image.stem)}'>")
    for label, run in runs.items():
        parts.append(f"<h2>Metrics: {html.escape(label)}</h2>")
        parts.append(metrics_table(run["records"]) if run["records"] else "<p>no steps logged yet</p>")
    parts.append("</body></html>\n")
    return "".join(parts)
