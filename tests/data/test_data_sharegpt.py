"""ShareGPT records, data.fields mappings, datasets.save_to_disk directories, truncation and batch checks."""

from __future__ import annotations

import pytest

from streamtune.data import build_data
from streamtune.data.formats import encode
from streamtune.data.sources import Record, read_records
from streamtune.errors import InputError

SHAREGPT = {"conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "What is 2 + 3?"},
    {"from": "gpt", "value": "2 + 3 = 5."},
    {"from": "user", "value": "And 4 + 4?"},
    {"from": "assistant", "value": "4 + 4 = 8."},
]}
MESSAGES = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8."},
]}


def test_sharegpt_encodes_like_the_same_messages(tok):
    ids, labels = encode(Record(SHAREGPT, "f:1"), "sharegpt", tok, "text", response_only=True)
    assert (ids, labels) == encode(Record(MESSAGES, "f:1"), "messages", tok, "text", response_only=True)
    assert any(label == -100 for label in labels) and any(label != -100 for label in labels)


def test_sharegpt_auto_detected(tmp_path, tok, write_jsonl, data_cfg):
    path = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT, SHAREGPT])
    _, _, stats = build_data(data_cfg(path), tok, 1, 0)
    assert stats.format == "sharegpt" and stats.num_samples == 2 and stats.response_only


@pytest.mark.parametrize("bad, expected", [
    ({"conversations": "hi"}, r"d\.jsonl:2: field 'conversations' must be a list"),
    ({"conversations": []}, r"d\.jsonl:2: field 'conversations' is empty"),
    ({"conversations": [{"from": "bot", "value": "x"}]},
     r"d\.jsonl:2: field conversations\[0\]\.from is 'bot'; allowed: human, user, gpt, assistant, system"),
    ({"conversations": [{"from": "human", "value": 3}]}, r"d\.jsonl:2: field conversations\[0\]\.value must be a string"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, r"d\.jsonl:2: field 'conversations' has no assistant turn"),
])
def test_bad_sharegpt_record_names_line_and_field(tmp_path, tok, write_jsonl, data_cfg, bad, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT, bad])
    with pytest.raises(InputError, match=expected):
        build_data(data_cfg(path, format="sharegpt"), tok, 1, 0)


def test_field_mapping_renames_keys(tmp_path, tok, write_jsonl, data_cfg):
    mapped = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Say red.", "answer": "red"}] * 3)
    plain = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say red.", "output": "red"}] * 3)
    fields = {"instruction": "question", "output": "answer"}
    train, _, stats = build_data(data_cfg(mapped, fields=fields), tok, 1, 0)
    ref, _, ref_stats = build_data(data_cfg(plain), tok, 1, 0)
    assert stats.format == "alpaca" and stats.num_tokens == ref_stats.num_tokens
    assert next(train)["input_ids"].tolist() == next(ref)["input_ids"].tolist()
    body = write_jsonl(tmp_path / "body.jsonl", [{"body": "hello world"}])
    _, _, text_stats = build_data(data_cfg(body, fields={"text": "body"}), tok, 1, 0)
    assert text_stats.format == "text"


def test_field_mapping_missing_key_names_record(tmp_path, tok, write_jsonl, data_cfg):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}, {"question": "c", "reply": "d"}])
    with pytest.raises(InputError, match=r"qa\.jsonl:2: missing field 'answer', which data\.fields maps to 'output' "
                                         r"\(keys found: question, reply\)"):
        build_data(data_cfg(path, fields={"instruction": "question", "output": "answer"}), tok, 1, 0)


def test_unmapped_keys_suggest_data_fields(tmp_path, tok, write_jsonl, data_cfg):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(InputError, match=r"auto-detection failed .* data\.fields"):
        build_data(data_cfg(path), tok, 1, 0)


def _save_dataset(directory, rows, split=None):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list(rows)
    if split is not None:
        dataset = datasets.DatasetDict({name: dataset for name in split})
    dataset.save_to_disk(str(directory))
    return directory


def test_saved_dataset_directory(tmp_path, tok, data_cfg):
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("red", "blue", "green")]
    plain = _save_dataset(tmp_path / "plain", rows)
    records = read_records(str(plain))
    assert [r.data for r in records] == rows and records[2].where == f"{plain}: record 3"
    _, _, stats = build_data(data_cfg(plain), tok, 1, 0)
    assert stats.format == "alpaca" and stats.num_samples == 3
    split = _save_dataset(tmp_path / "dict", rows, split=("train", "test"))
    assert records_data(split) == rows
    only = _save_dataset(tmp_path / "only", rows, split=("validation",))
    assert read_records(str(only))[0].where == f"{only}[validation]: record 1"
    many = _save_dataset(tmp_path / "many", rows, split=("a", "b"))
    with pytest.raises(InputError, match=r"data\.path: .*many holds the splits a, b but no 'train'"):
        read_records(str(many))


def records_data(directory):
    return [r.data for r in read_records(str(directory))]


def test_saved_dataset_bad_record_names_record_number(tmp_path, tok, data_cfg):
    rows = [{"instruction": "Say red.", "output": "red"}, {"instruction": "Say blue.", "output": ""}]
    path = _save_dataset(tmp_path / "ds", rows)
    with pytest.raises(InputError, match=r"ds: record 2: field 'output' is empty"):
        build_data(data_cfg(path), tok, 1, 0)


def test_saved_dataset_without_datasets_names_the_extra(tmp_path, monkeypatch):
    import sys

    path = _save_dataset(tmp_path / "ds", [{"text": "a"}])
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(InputError, match=r"data\.path: .*needs the datasets package: pip install 'streamtune\[datasets\]'"):
        read_records(str(path))


def test_plain_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"data\.path: .* is a directory but not one written by datasets\.save_to_disk"):
        read_records(str(tmp_path))


def test_long_samples_are_counted_with_tokens_cut(tmp_path, tok, write_jsonl, data_cfg):
    long_text = " ".join(["word"] * 60)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"}, {"text": long_text}, {"text": long_text}])
    _, _, full = build_data(data_cfg(path, seq_len=512), tok, 1, 0)
    _, _, cut = build_data(data_cfg(path, seq_len=16), tok, 1, 0)
    assert full.num_truncated == 0 and full.num_truncated_tokens == 0 and full.truncated_examples == []
    assert cut.num_truncated == 2
    assert cut.num_truncated_tokens == full.num_tokens - cut.num_tokens > 0
    assert cut.truncated_examples[0].startswith(f"{path}:2 (")


def test_data_smaller_than_one_batch(tmp_path, tok, write_jsonl, data_cfg):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}])
    with pytest.raises(InputError, match=r"data\.path: .*d\.jsonl' makes 1 sequence\(s\).*fewer than one batch of "
                                         r"train\.batch_size=4; add records or lower train\.batch_size to 1"):
        build_data(data_cfg(path, seq_len=64), tok, 4, 0)
    _, _, stats = build_data(data_cfg(path, seq_len=64, pack=False), tok, 2, 0)
    assert stats.rows_per_epoch == 2
