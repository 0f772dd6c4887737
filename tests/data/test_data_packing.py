import itertools
import json

import pytest
import torch

from streamtune.data import build_data
from streamtune.data.formats import IGNORE_INDEX
from streamtune.data.packing import TokenStore, collate, plan_rows
from streamtune.errors import InputError
from streamtune.models.build import build_model


def records(n):
    return [{"instruction": f"Repeat {i} times the word go.", "input": "", "output": " ".join(["go"] * (i % 7 + 1))}
            for i in range(n)]


def make_store(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(5, 1000, (n,), generator=gen).tolist()
        samples.append((ids, list(ids)))
    return TokenStore.from_samples(samples, max_len=10_000)


def test_packed_positions_and_boundary_labels():
    store = make_store([5, 3, 4, 6])
    rows = plan_rows(store, [0, 1, 2, 3], seq_len=10, pack=True)
    assert rows == [[0, 1], [2, 3]]
    batch = collate(store, rows, 10, True, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["use_cache"] is False
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]
    ids, labels = batch["input_ids"], batch["labels"]
    first = store.sample(0)[0].tolist()
    second = store.sample(1)[0].tolist()
    assert ids[0, :8].tolist() == first + second and ids[0, 8:].tolist() == [0, 0]
    # The first token of each sample is never a target: HF shifts labels, so it would be predicted
    # from the last token of the previous sample.
    assert labels[0].tolist() == [IGNORE_INDEX] + first[1:] + [IGNORE_INDEX] + second[1:] + [IGNORE_INDEX] * 2
    assert labels[1, 0] == IGNORE_INDEX and labels[1, 4] == IGNORE_INDEX


def test_truncation_is_counted():
    samples = [([1] * 20, [1] * 20), ([2] * 5, [2] * 5)]
    store = TokenStore.from_samples(samples, max_len=8)
    assert store.num_truncated == 1 and store.length(0) == 8 and store.num_tokens == 13


def test_unpacked_pads_with_mask():
    store = make_store([5, 11, 3])
    batch = collate(store, [[0], [1], [2]], 64, False, pad_id=0)
    assert batch["input_ids"].shape == (3, 16)
    assert batch["attention_mask"].sum(1).tolist() == [5, 11, 3]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["labels"][1, :11].tolist() == store.sample(1)[1].tolist()


@pytest.mark.parametrize("name, attn", [
    ("tiny-gemma4", "sdpa"), ("tiny-gemma4", "eager"), ("tiny-llama", "sdpa"), ("tiny-llama", "eager"),
    ("tiny-qwen3-moe", "sdpa"),
])
def test_packed_logits_equal_separate_logits(name, attn):
    model, _ = build_model(name, torch.float32, seed=0)
    model.set_attn_implementation(attn)
    # 70 > tiny-gemma4's sliding window (64): the sliding layers' window is exercised inside a sample.
    store = make_store([70, 30, 20, 9, 40, 50])
    rows = plan_rows(store, range(6), seq_len=128, pack=True)
    assert rows == [[0, 1, 2], [3, 4, 5]]
    batch = collate(store, rows, 128, True, pad_id=0)
    with torch.no_grad():
        packed = model(**batch).logits
        for b, row in enumerate(rows):
            cursor = 0
            for index in row:
                ids = store.sample(index)[0].long()[None]
                alone = model(input_ids=ids).logits[0]
                n = ids.shape[1]
                torch.testing.assert_close(packed[b, cursor:cursor + n], alone, atol=1e-5, rtol=1e-5)
                cursor += n


def test_without_use_cache_false_stock_models_mix_samples():
    # Why the batch carries use_cache=False: with a cache, transformers skips packed-sequence detection.
    model, _ = build_model("tiny-llama", torch.float32, seed=0)
    store = make_store([20, 20])
    batch = collate(store, [[0, 1]], 40, True, pad_id=0)
    with torch.no_grad():
        mixed = model(**{**batch, "use_cache": True}).logits[0, 20:40]
        alone = model(input_ids=store.sample(1)[0].long()[None]).logits[0]
    assert (mixed - alone).abs().max() > 1e-3


def test_loss_ignores_boundaries_and_padding():
    model, _ = build_model("tiny-llama", torch.float32, seed=0)
    store = make_store([12, 9])
    batch = collate(store, [[0, 1]], 32, True, pad_id=0)
    with torch.no_grad():
        loss = model(**batch).loss
        total, count = 0.0, 0
        for index in (0, 1):
            ids = store.sample(index)[0].long()[None]
            logits = model(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            count += ids.shape[1] - 1
    torch.testing.assert_close(loss, total / count, atol=1e-5, rtol=1e-5)


def take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("pack", [True, False])
def test_resume_is_exact(tmp_path, tok, write_jsonl, data_cfg, pack):
    path = write_jsonl(tmp_path / "d.jsonl", records(23))
    cfg = data_cfg(path, seq_len=64, pack=pack)
    reference, _, stats = build_data(cfg, tok, 3, 7)
    expected = take(reference, 3 * stats.batches_per_epoch + 2)  # spans several epochs
    for stop in (1, stats.batches_per_epoch, 2 * stats.batches_per_epoch + 1):
        first, _, _ = build_data(cfg, tok, 3, 7)
        take(first, stop)
        state = first.state_dict()
        resumed, _, _ = build_data(cfg, tok, 3, 7)
        resumed.load_state_dict(state)
        for got, want in zip(take(resumed, len(expected) - stop), expected[stop:]):
            for key in ("input_ids", "labels", "position_ids"):
                assert torch.equal(got[key], want[key])


def test_shuffle_differs_per_epoch_and_seed(tmp_path, tok, write_jsonl, data_cfg):
    path = write_jsonl(tmp_path / "d.jsonl", records(40))
    loader, _, _ = build_data(data_cfg(path, seq_len=64), tok, 1, 0)
    other, _, _ = build_data(data_cfg(path, seq_len=64), tok, 1, 1)
    assert loader.rows(0) != loader.rows(1) and loader.rows(0) != other.rows(0)
    assert sorted(itertools.chain(*loader.rows(0))) == sorted(itertools.chain(*loader.rows(1))) == list(range(40))
    fixed, _, _ = build_data(data_cfg(path, seq_len=64, shuffle=False), tok, 1, 0)
    assert list(itertools.chain(*fixed.rows(0))) == list(range(40)) == list(itertools.chain(*fixed.rows(3)))


def test_resume_with_other_settings_fails(tmp_path, tok, write_jsonl, data_cfg):
    path = write_jsonl(tmp_path / "d.jsonl", records(10))
    loader, _, _ = build_data(data_cfg(path, seq_len=64), tok, 2, 0)
    state = loader.state_dict()
    other, _, _ = build_data(data_cfg(path, seq_len=32), tok, 2, 0)
    with pytest.raises(InputError, match=r"resume: .*seq_len: saved 64, now 32"):
        other.load_state_dict(state)


def test_eval_split(tmp_path, tok, write_jsonl, data_cfg):
    path = write_jsonl(tmp_path / "d.jsonl", records(40))
    train, evaluation, stats = build_data(data_cfg(path, seq_len=64, eval_fraction=0.25), tok, 2, 0)
    assert (stats.num_samples, stats.num_eval_samples) == (30, 10)
    first = list(evaluation.eval_batches())
    second = list(evaluation.eval_batches())
    assert len(first) == len(evaluation) and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))
    eval_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in first)
    assert eval_tokens == stats.num_eval_trained_tokens
    _, again, _ = build_data(data_cfg(path, seq_len=64, eval_fraction=0.25), tok, 2, 5)
    assert torch.equal(again.store.ids, evaluation.store.ids)  # holdout does not depend on the seed
    eval_path = write_jsonl(tmp_path / "e.jsonl", records(4))
    _, evaluation, stats = build_data(data_cfg(path, eval_path=str(eval_path)), tok, 2, 0)
    assert (stats.num_samples, stats.num_eval_samples) == (40, 4)
    assert build_data(data_cfg(path), tok, 2, 0)[1] is None
    with pytest.raises(InputError, match=r"data\.eval_fraction: 0\.99 of 1 record"):
        build_data(data_cfg(write_jsonl(tmp_path / "one.jsonl", records(1)), eval_fraction=0.99), tok, 1, 0)


def test_stats(tmp_path, tok, write_jsonl, data_cfg):
    path = write_jsonl(tmp_path / "d.jsonl", records(12))
    loader, _, stats = build_data(data_cfg(path, seq_len=64), tok, 1, 0)
    batches = take(loader, stats.batches_per_epoch)
    assert stats.rows_per_epoch == stats.batches_per_epoch and loader.state_dict()["epoch"] == 1
    assert stats.num_tokens == loader.num_tokens == sum(int((b["input_ids"] != tok.pad_token_id).sum()) for b in batches)
    assert stats.num_trained_tokens == sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    assert stats.packing_efficiency == pytest.approx(stats.num_tokens / (stats.rows_per_epoch * 64))
    assert stats.to_dict()["format"] == "alpaca" and stats.num_samples == 12 and stats.num_truncated == 0


@pytest.mark.parametrize("pack", [True, False])
def test_batches_name_their_samples_and_records(tmp_path, tok, write_jsonl, data_cfg, pack):
    lines = records(12)
    path = write_jsonl(tmp_path / "d.jsonl", [lines[0], "", *lines[1:]])  # a blank line: records keep file lines
    loader, _, _ = build_data(data_cfg(path, seq_len=64, pack=pack, eval_fraction=0.25), tok, 2, 3)
    batch = next(loader)
    assert batch["sample_indices"] == loader.rows(0)[:2]
    for row, ids in zip(batch["sample_indices"], batch["input_ids"]):
        first = row[0]
        expected_ids, _ = loader.store.sample(first)
        assert torch.equal(ids[:expected_ids.numel()], expected_ids.long())
        file, _, line = loader.where(first).rpartition(":")
        record = json.loads(path.read_text().splitlines()[int(line) - 1])
        assert file == str(path) and record["instruction"] in tok.decode(expected_ids.tolist())
    assert loader.where(10_000) == "sample 10000"
