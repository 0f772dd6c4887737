import subprocess
import sys

import pytest

from streamtune import compat
from streamtune.compat import patches
from streamtune.compat.registry import Outcome, in_affected_range, run_isolated
from streamtune.errors import InputError

PUBLISHED = [f"P{i}" for i in range(1, 12)]


def test_registry_has_all_published_and_new_ids():
    ids = [entry.id for entry in compat.ENTRIES]
    assert ids[:11] == PUBLISHED
    assert ids[11:] == ["N1", "N2", "N3", "N4", "N5"]
    for entry in compat.ENTRIES:
        assert entry.title and entry.references and callable(entry.reproducer)
        if entry.fix_kind == "patch":
            assert entry.fix_id in compat.FIX_INSTALLERS


def test_affected_ranges_parse_with_packaging():
    assert in_affected_range({"bitsandbytes": "<0.50.0"}, {"bitsandbytes": "0.49.2"}) is True
    assert in_affected_range({"bitsandbytes": "<0.50.0"}, {"bitsandbytes": "0.50.2"}) is False
    assert in_affected_range({"transformers": ">=5.5,<5.6"}, {"transformers": "5.5.4"}) is True
    assert in_affected_range({"peft": ""}, {"peft": "0.21.2"}) is True
    assert in_affected_range({"bitsandbytes": ""}, {"bitsandbytes": None}) is None
    assert in_affected_range({"torch": "<3"}, {"torch": "not-a-version"}) is None


def test_failing_reproducer_becomes_null_with_reason():
    def broken():
        raise ValueError("boom")

    outcome, seconds = run_isolated(broken)
    assert outcome.reproduces is None
    assert "ValueError: boom" in outcome.reason and seconds >= 0
    outcome, _ = run_isolated(lambda: "not an outcome")
    assert outcome.reproduces is None and "not an Outcome" in outcome.reason
    assert run_isolated(lambda: Outcome(True, "x"))[0] == Outcome(True, "x")


def test_unknown_id_is_an_input_error():
    with pytest.raises(InputError, match=r"--only: unknown id\(s\) Q9; known: P1"):
        compat.select(["P1", "Q9"])
    assert [e.id for e in compat.select(["n1", " P2"])] == ["P2", "N1"]


def test_import_is_light():
    code = ("import sys, streamtune.compat; "
            "print('torch' in sys.modules, 'bitsandbytes' in sys.modules, 'peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


class _Owner:
    value = "original"


def test_patch_install_is_idempotent_and_reverts_exactly():
    calls = []

    def installer(patch_set):
        calls.append(1)
        patch_set.replace(_Owner, "value", "patched")
        patch_set.replace(_Owner, "extra", 1)

    assert patches.install("t", installer) is True
    assert patches.install("t", installer) is False
    assert calls == [1] and _Owner.value == "patched" and _Owner.extra == 1
    with patches.temporarily_removed(["t"], {"t": installer}):
        assert _Owner.value == "original" and not hasattr(_Owner, "extra")
    assert _Owner.value == "patched"
    assert patches.uninstall("t") is True and patches.uninstall("t") is False
    assert _Owner.__dict__["value"] == "original" and "extra" not in _Owner.__dict__


def test_failed_installer_leaves_nothing_behind():
    def installer(patch_set):
        patch_set.replace(_Owner, "value", "half")
        raise RuntimeError("cannot")

    with pytest.raises(RuntimeError):
        patches.install("bad", installer)
    assert _Owner.value == "original" and not patches.is_applied("bad")


def test_missing_optional_package_reads_cannot_test():
    def needs_missing():
        import streamtune_no_such_package  # noqa: F401

    outcome, _ = run_isolated(needs_missing)
    assert outcome == Outcome(None, "cannot test here: streamtune_no_such_package not installed")
