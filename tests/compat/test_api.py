"""check / apply / revert over the whole registry."""

import sys

import pytest

from streamtune import compat
from streamtune.compat import entries
from streamtune.compat.registry import Entry, Outcome


def test_missing_bitsandbytes_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    results = compat.check(["P1", "P3", "P11", "N3", "N4"])
    for result in results:
        assert result.reproduces is None
        assert result.reason == "cannot test here: bitsandbytes not installed"
    assert compat.apply(["P1", "P2", "P9", "N3", "P11"]) == []


def _fake(entry_id, reproduces, fix_id):
    return Entry(entry_id, f"fake {entry_id}", {}, ("ref",), lambda: Outcome(reproduces, "fake"), fix_id, "patch")


class _Target:
    flag = "stock"


def _set_flag(patch_set):
    patch_set.replace(_Target, "flag", "fixed")


def _set_other(patch_set):
    patch_set.replace(_Target, "other", "fixed")


def test_apply_only_fixes_that_reproduce_idempotent_and_reversible(monkeypatch, caplog):
    fakes = (_fake("P1", True, "fix-a"), _fake("P2", False, "fix-b"), _fake("P3", None, "fix-b"))
    monkeypatch.setattr(entries, "ENTRIES", fakes)
    monkeypatch.setattr("streamtune.compat.api.ENTRIES", fakes)
    monkeypatch.setitem(entries.FIX_INSTALLERS, "fix-a", _set_flag)
    monkeypatch.setitem(entries.FIX_INSTALLERS, "fix-b", _set_other)
    with caplog.at_level("INFO", logger="streamtune.compat"):
        assert compat.apply() == ["fix-a"]
    assert "P1 reproduces" in caplog.text and "fix fix-b not applied" in caplog.text
    assert compat.apply() == ["fix-a"] and _Target.flag == "fixed" and not hasattr(_Target, "other")
    rows = {r.id: r for r in compat.check()}
    assert rows["P1"].applied and rows["P1"].reproduces is True and rows["P1"].reproduces_with_fix is True
    assert not rows["P2"].applied and rows["P2"].reproduces_with_fix is None
    assert compat.revert() == ["fix-a"] and _Target.__dict__["flag"] == "stock"
    assert compat.revert() == []


def test_check_lifts_applied_fixes_while_reproducing():
    pytest.importorskip("accelerate")
    compat.apply(["N1"])
    [row] = compat.check(["N1"])
    assert row.applied and row.reproduces is True and row.reproduces_with_fix is False
    assert compat.applied() == ["lora-offloaded-materialise"]
