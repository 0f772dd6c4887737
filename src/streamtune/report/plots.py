"""PNG plots of run metrics with matplotlib's Agg backend (no display needed).

Each plot shows one metric against the optimizer step for every run given, so two runs compare
on one plot. matplotlib is an optional extra (``pip install 'streamtune[report]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class PlotSpec:
    """One plot: a file name, a title, the y-axis label, and the series it draws per run."""

    file_name: str
    title: str
    y_label: str
    series: tuple[tuple[str, str, float], ...]  # (metric key, legend suffix, scale)


GIB = 2**30
PLOTS = (
    PlotSpec("report-loss.png", "Loss", "loss (nats / token)", (("loss", "train", 1.0), ("eval_loss", "eval", 1.0))),
    PlotSpec("report-tokens-per-s.png", "Throughput", "tokens / s", (("tok_s", "", 1.0),)),
    PlotSpec("report-gpu-peak.png", "GPU peak memory", "GiB", (("gpu_peak_bytes", "", 1.0 / GIB),)),
    PlotSpec("report-h2d.png", "Host-to-GPU copy rate", "GB/s", (("h2d_gbps", "", 1.0),)),
)


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def series_of(records: list[dict[str, Any]], key: str, scale: float) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` where the records have a number for it."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in record:
            steps.append(int(record["step"]))
            values.append(float(value) * scale)
    return steps, values


def draw_plot(spec: PlotSpec, runs: dict[str, list[dict[str, Any]]], out_dir: Path) -> Path | None:
    """Draw ``spec`` for every run into ``out_dir / spec.file_name``; None when no run has the metric."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 3.6), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    drawn = 0
    for label, records in runs.items():
        for key, suffix, scale in spec.series:
            steps, values = series_of(records, key, scale)
            if not values or (key != "loss" and key != "eval_loss" and not any(values)):
                continue
            name = " ".join(part for part in (label if len(runs) > 1 else "", suffix) if part) or key
            marker = "o" if key == "eval_loss" or len(values) < 30 else None
            axes.plot(steps, values, marker=marker, markersize=3, linewidth=1.4, label=name)
            drawn += 1
    if not drawn:
        return None
    axes.set_title(spec.title)
    axes.set_xlabel("step")
    axes.set_ylabel(spec.y_label)
    axes.grid(True, alpha=0.3)
    if drawn > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    path = out_dir / spec.file_name
    _save(figure.savefig, path)
    return path


def _save(savefig: Callable[..., Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    savefig(str(tmp), format="png")
    tmp.replace(path)


def draw_all(runs: dict[str, list[dict[str, Any]]], out_dir: Path) -> list[Path]:
    """Every plot that has data, as PNG files in ``out_dir``."""
    paths = []
    for spec in PLOTS:
        path = draw_plot(spec, runs, out_dir)
        if path is not None:
            paths.append(path)
    return paths
