"""RUN/report.html and its plots; the model card; progress lines; wandb checks."""

from __future__ import annotations

import builtins
import io
import json

import pytest

from streamtune.cli import main
from streamtune.errors import InputError
from streamtune.report import refresh_run_report, write_report


def _fake_run(run_dir, steps=10, offset=0.0, gpu=True):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        "model: {name: tiny-gemma4}\ndata: {path: d.jsonl, format: alpaca}\ntrain: {max_steps: %d}\n" % steps)
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 5.0 - 0.1 * step + offset, "lr": 1e-3, "tokens": 256, "tok_s": 100.0 + step,
                  "step_s": 2.5, "gpu_peak_bytes": (3 * 2**30 if gpu else 0), "h2d_gbps": (20.0 if gpu else 0.0)}
        if step % 5 == 0:
            record["eval_loss"] = 5.2 - 0.1 * step + offset
        records.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_report_has_plots_and_a_summary(tmp_path):
    run = _fake_run(tmp_path / "a")
    page = write_report([run])
    assert page == run / "report.html"
    html = page.read_text()
    for name in ("report-loss.png", "report-tokens-per-s.png", "report-gpu-peak.png", "report-h2d.png"):
        assert (run / name).stat().st_size > 1000 and f"src='{name}'" in html
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiny-gemma4" in html and "d.jsonl (alpaca)" in html and "10/10" in html
    assert "<td>4.9</td><td>4</td><td>4.2</td><td>105.5</td>" in html  # first, last, best eval loss, mean tok/s
    assert "3.00 GiB" in html


def test_cpu_run_has_no_empty_gpu_plots(tmp_path):
    run = _fake_run(tmp_path / "cpu", gpu=False)
    write_report([run])
    assert (run / "report-loss.png").is_file()
    assert not (run / "report-gpu-peak.png").exists() and not (run / "report-h2d.png").exists()


def test_two_runs_on_one_plot(tmp_path):
    a, b = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", steps=6, offset=0.5)
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert "a vs b" in html and html.count("<h2>Metrics:") == 2
    assert (tmp_path / "cmp" / "report-loss.png").is_file()


def test_without_matplotlib_a_table_and_the_hint(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    run = _fake_run(tmp_path / "a")
    html = write_report([run]).read_text()
    assert "pip install &#x27;streamtune[report]&#x27;" in html
    assert not list(run.glob("*.png"))
    assert html.count("<tr>") >= 10 + 1


def test_not_a_run(tmp_path, capsys):
    with pytest.raises(InputError, match="metrics.jsonl"):
        write_report([tmp_path])
    assert main(["report", str(tmp_path / "none")]) == 2


def test_refresh_never_raises_and_warns_once(tmp_path, capsys):
    run = _fake_run(tmp_path / "a")
    (run / "report.html").mkdir()  # cannot be replaced by a file
    with pytest.warns(UserWarning, match="report.html"):
        assert refresh_run_report(run) is None
    assert refresh_run_report(run) is None
    assert capsys.readouterr().err.count("could not write the run report") == 1


def test_progress_lines_when_not_a_terminal(tmp_path, monkeypatch):
    from streamtune.train.metrics import MetricsLogger, progress_every

    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    logger = MetricsLogger(tmp_path, max_steps=45, start_step=0, tensorboard=False, progress=True)
    for step in range(1, 46):
        logger.log({"step": step, "loss": 1.0, "tok_s": 10.0, "step_s": 2.0 if step < 40 else 4.0})
    logger.close()
    lines = stream.getvalue().splitlines()
    assert progress_every(45) == 2
    assert len(lines) == 23 and lines[-1].startswith("step 45/45 loss=1.0000") and "\r" not in stream.getvalue()
    assert lines[0].endswith("eta=1:26")  # 43 steps left at 2 s
    # step 44: the last 20 step times average (15 x 2 + 5 x 4) / 20 = 2.5 s, 1 step left
    assert lines[-2].startswith("step 44/45") and lines[-2].endswith("eta=0:02")
    assert "eta" not in lines[-1]


def test_wandb_missing_is_an_input_error(monkeypatch):
    from streamtune.train.metrics import check_loggers
    from streamtune.config import OutputConfig

    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(InputError, match="output.wandb: 'proj' needs the wandb package"):
        check_loggers(OutputConfig(wandb="proj"))
    check_loggers(OutputConfig())


def test_model_card_says_what_was_trained(tmp_path, run_dict):
    from streamtune.config import from_dict
    from streamtune.report.card import model_card

    run = _fake_run(tmp_path / "a")
    cfg = from_dict(run_dict(run, lora={"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}))
    card = model_card(run, cfg, {"model_name": "tiny-gemma4", "preset": True, "seed": 3, "dtype": "float32",
                                 "codec": "int8"})
    for text in ("base_model: tiny-gemma4", "seed 3", "stored as int8", "quickstart.jsonl", "format alpaca",
                 "| steps | 10 ", "final train loss | 4.0000", "final eval loss | 4.2000",
                 "rank 8, alpha 16", "q_proj, v_proj", "## Made by"):
        assert text in card, text
