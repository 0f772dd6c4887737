"""A run's console shows streamtune's progress and results, not deprecation warnings that our own calls
of library APIs cause (pytest's filterwarnings hides those in-process, so the CLI runs as a subprocess
with every warning shown)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import yaml

from tests.cli.warnings_probe import MARKER, _show

PROBE = Path(__file__).with_name("warnings_probe.py")
REPO = Path(__file__).resolve().parents[2]


def test_train_and_merge_print_no_deprecation_caused_by_streamtune(tmp_path, run_dict):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(tmp_path / "run", train={"max_steps": 1})))
    env = {**os.environ, "PYTHONWARNINGS": "default", "PYTHONPATH": os.pathsep.join(
        [str(Path(__import__("streamtune").__file__).parents[1]), str(REPO), os.environ.get("PYTHONPATH", "")])}
    for argv in (["train", str(cfg)], ["merge", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "merged")]):
        done = subprocess.run([sys.executable, "-W", "default", str(PROBE), *argv], capture_output=True, text=True,
                              env=env, timeout=600)
        assert done.returncode == 0, done.stderr
        ours = [line for line in done.stderr.splitlines()
                if line.startswith(MARKER) and ("FutureWarning" in line or "DeprecationWarning" in line)]
        assert ours == [], "\n".join(ours)
    assert (tmp_path / "merged" / "config.json").is_file()


class _OldStyleModel:
    """A model of a transformers that warns on the old checkpointing name."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        warnings.warn("`gradient_checkpointing_enable` is deprecated", FutureWarning)


def test_probe_flags_a_deprecated_call_made_by_streamtune(capsys):
    from streamtune.models.adapters import enable_activation_checkpointing

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show
        enable_activation_checkpointing(_OldStyleModel())  # falls back to the old name, which warns here
    err = capsys.readouterr().err
    assert f"{MARKER} FutureWarning: `gradient_checkpointing_enable` is deprecated" in err


def test_bitsandbytes_advice_about_a_kernel_streamtune_never_uses_is_dropped(caplog):
    import logging

    from streamtune.cli import _DropMessage, quiet_irrelevant_logs

    quiet_irrelevant_logs()
    quiet_irrelevant_logs()  # idempotent: main() runs it on every command
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels`", "No module named 'kernels'")
        logger.warning("a bitsandbytes warning that matters")
    assert [r.getMessage() for r in caplog.records] == ["a bitsandbytes warning that matters"]
    assert sum(isinstance(f, _DropMessage) for f in logger.filters) == 1
