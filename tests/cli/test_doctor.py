"""``streamtune doctor``: JSON contract, markdown, --only, bad input, exit codes."""

import json

import pytest

from streamtune import compat
from streamtune.cli import main

P_IDS = [f"P{i}" for i in range(1, 12)]
N_IDS = ["N1", "N2", "N3", "N4", "N5"]
ROW_KEYS = {"id", "title", "reproduces", "reason", "fix_available", "applied"}


@pytest.fixture(autouse=True)
def _no_fix_leaks():
    compat.revert()
    yield
    compat.revert()


def test_full_json_run_lists_every_entry(capsys, tmp_path):
    table = tmp_path / "VALIDATION-STATUS.md"
    assert main(["doctor", "--json", "--markdown", str(table)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    progress = captured.err.splitlines()
    total = len(P_IDS + N_IDS)
    for index, entry_id in enumerate(P_IDS + N_IDS, start=1):  # one line as each check starts, one as it ends
        started = [line for line in progress if line.startswith(f"[{index}/{total}] {entry_id}: ") and line.endswith(" ...")]
        ended = [line for line in progress if line.startswith(f"[{index}/{total}] {entry_id}: ") and line.endswith(" s)")]
        assert len(started) == 1 and len(ended) == 1, (entry_id, progress)
        assert progress.index(started[0]) < progress.index(ended[0])
    assert set(report["versions"]) == {"torch", "transformers", "peft", "accelerate", "bitsandbytes"}
    assert report["cuda"]["available"] in (True, False)
    rows = report["fixes"]
    assert [r["id"] for r in rows] == P_IDS + N_IDS
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["reproduces"] in (True, False, None) and row["reason"]
        assert row["applied"] is False
    by_id = {r["id"]: r for r in rows}
    assert by_id["N1"]["reproduces"] is True and by_id["N1"]["fix_available"] is True
    assert by_id["P10"]["reproduces"] is False
    text = table.read_text()
    assert text.startswith("# VALIDATION-STATUS")
    for entry_id in P_IDS + N_IDS:
        assert f"| {entry_id} |" in text
    assert compat.applied() == []  # doctor without --apply changes nothing


def test_only_and_apply_show_fix_working(capsys):
    assert main(["doctor", "--only", "N1,N5", "--apply"]) == 0
    out = capsys.readouterr().out
    assert "stack: torch" in out and "N1" in out and "N5" in out and "P2 " not in out
    assert "with the fix applied: does not reproduce" in out


def test_unknown_only_id_exits_2(capsys):
    assert main(["doctor", "--only", "P1,Z7"]) == 2
    err = capsys.readouterr().err
    assert "--only: unknown id(s) Z7" in err and "known: P1" in err


def test_empty_only_exits_2(capsys):
    assert main(["doctor", "--only", " , "]) == 2
    assert "--only: give at least one id" in capsys.readouterr().err


def test_markdown_into_missing_directory_exits_2_before_work(capsys, tmp_path):
    target = tmp_path / "nope" / "STATUS.md"
    assert main(["doctor", "--only", "P10", "--markdown", str(target)]) == 2
    assert "--markdown: directory" in capsys.readouterr().err and not target.exists()
    assert main(["doctor", "--only", "P10", "--markdown", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_failing_reproducer_does_not_crash_doctor(capsys, monkeypatch):
    from streamtune.compat import entries
    from streamtune.compat.registry import Entry

    def explode():
        raise RuntimeError("reproducer exploded")

    fake = (Entry("P1", "fake", {}, ("ref",), explode),)
    monkeypatch.setattr(entries, "ENTRIES", fake)
    monkeypatch.setattr("streamtune.compat.api.ENTRIES", fake)
    assert main(["doctor", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["fixes"]
    assert row["reproduces"] is None and "RuntimeError: reproducer exploded" in row["reason"]


def test_gpu_fields_absent_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert main(["doctor", "--json", "--only", "P10"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cuda"] == {"available": False, "torch_cuda": None} and report["pinned_h2d_gbps"] is None
