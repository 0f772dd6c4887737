"""Resolving MODEL_OR_ADAPTER: presets, checkpoint dirs, adapters, run checkpoints, run dirs."""

from __future__ import annotations

import pytest

from streamtune.errors import InputError
from streamtune.infer import resolve_source


def test_preset_is_a_bare_base():
    source = resolve_source("tiny-gemma4")
    assert source.base_name == "tiny-gemma4" and source.adapter_dir is None and source.run_dir is None


def test_missing_name_says_what_is_accepted(tmp_path):
    with pytest.raises(InputError, match="MODEL_OR_ADAPTER: .*preset name .*adapter directory"):
        resolve_source(str(tmp_path / "nope"))


def test_directory_that_is_nothing_known(tmp_path):
    with pytest.raises(InputError, match="config.json.*adapter_config.json.*config.yaml"):
        resolve_source(str(tmp_path))


def test_run_without_adapter_or_checkpoint(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {name: tiny-gemma4}\n")
    with pytest.raises(InputError, match="neither a final adapter"):
        resolve_source(str(tmp_path))


def test_run_dir_adapter_and_checkpoint_resolve_to_the_same_base(tiny_run):
    by_run = resolve_source(str(tiny_run))
    by_adapter = resolve_source(str(tiny_run / "adapter"))
    by_checkpoint = resolve_source(str(tiny_run / "checkpoints" / "step-1"))
    assert by_run.adapter_dir == (tiny_run / "adapter").resolve()
    assert by_checkpoint.adapter_dir == (tiny_run / "checkpoints" / "step-1").resolve()
    for source in (by_run, by_adapter, by_checkpoint):
        assert source.base_name == "tiny-gemma4"
        assert source.run_dir == tiny_run
        assert source.run_config["memory"]["codec"] == "bf16"
        assert source.tokenizer_dir == (tiny_run / "adapter").resolve()
