import importlib.util
import json
from importlib import resources
from pathlib import Path

import pytest

from streamtune.data import build_data
from streamtune.data.sources import read_records
from streamtune.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples/data/quickstart.jsonl"


def test_jsonl_records_and_blank_lines(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "", "   ", {"text": "b"}])
    records = read_records(str(path))
    assert [r.data["text"] for r in records] == ["a", "b"]
    assert records[1].where == f"{path}:4"


@pytest.mark.parametrize("line, expected", [
    ('{"text": "a",}', r"d\.jsonl:2: invalid JSON"),
    ('["text"]', r"d\.jsonl:2: expected a JSON object \{\.\.\.\}, got list"),
    ('"just a string"', r"d\.jsonl:2: expected a JSON object"),
])
def test_bad_line_names_file_and_line(tmp_path, write_jsonl, line, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, line, {"text": "never read"}])
    with pytest.raises(InputError, match=expected):
        read_records(str(path))


def test_missing_file_names_data_path(tmp_path, tok, data_cfg):
    with pytest.raises(InputError, match=r"data\.path: .*nope\.jsonl' does not exist"):
        build_data(data_cfg(tmp_path / "nope.jsonl"), tok, 1, 0)
    with pytest.raises(InputError, match=r"data\.eval_path: .*missing\.jsonl' does not exist"):
        build_data(data_cfg(QUICKSTART, eval_path=str(tmp_path / "missing.jsonl")), tok, 1, 0)
    with pytest.raises(InputError, match=r"data\.path: .* is a directory"):
        build_data(data_cfg(tmp_path), tok, 1, 0)


def test_empty_file_and_unknown_suffix(tmp_path, tok, data_cfg):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match=r"data\.path: .*e\.jsonl' holds no records"):
        build_data(data_cfg(tmp_path / "e.jsonl"), tok, 1, 0)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(InputError, match=r"data\.path: .*suffix '\.csv'; supported: \.jsonl, \.parquet"):
        read_records(str(tmp_path / "d.csv"))


def test_parquet(tmp_path, tok, data_cfg):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("red", "blue", "green")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    records = read_records(str(tmp_path / "d.parquet"))
    assert [r.data for r in records] == rows and records[2].where.endswith("d.parquet:row 3")
    train, _, stats = build_data(data_cfg(tmp_path / "d.parquet"), tok, 1, 0)
    assert stats.format == "alpaca" and stats.num_samples == 3
    bad = [{"instruction": "x", "input": "", "output": 5}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad\.parquet:row 1: field 'output' must be a string, got int"):
        build_data(data_cfg(tmp_path / "bad.parquet"), tok, 1, 0)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"data\.path: .*broken\.parquet is not a readable Parquet file"):
        read_records(str(tmp_path / "broken.parquet"))


def test_bundled_dataset_parses(tok, data_cfg):
    records = read_records(str(QUICKSTART))
    assert 300 <= len(records) <= 600
    for record in records:
        assert set(record.data) == {"instruction", "input", "output"}
        assert record.data["instruction"] and record.data["output"]
    packaged = resources.files("streamtune.assets").joinpath("quickstart.jsonl").read_text(encoding="utf-8")
    assert packaged == QUICKSTART.read_text(encoding="utf-8")
    _, _, stats = build_data(data_cfg(QUICKSTART, seq_len=128), tok, 4, 0)
    assert stats.format == "alpaca" and stats.num_truncated == 0 and stats.num_trained_tokens > 0


def test_bundled_dataset_is_reproducible():
    spec = importlib.util.spec_from_file_location("make_quickstart", ROOT / "examples/data/make_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    records = [json.loads(line) for line in QUICKSTART.read_text().splitlines()]
    assert records == module.make_records()
    assert QUICKSTART.read_text() == module.render(module.make_records())
