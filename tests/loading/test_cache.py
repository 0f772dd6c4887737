"""The on-disk pack cache: second runs read packed layers, verified; any change or damage re-encodes."""

from __future__ import annotations

import json
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

from streamtune.loading import open_checkpoint
from streamtune.loading.cache import PackCache
from streamtune.offload import place
from tests.loading.ckpts import save_preset, working_copy, shard_paths

IDS = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return save_preset("tiny-gemma4", tmp_path_factory.mktemp("ckpt") / "tiny-gemma4")


@pytest.fixture
def ckpt(tmp_path, pristine):
    return working_copy(pristine, tmp_path)


def _load(directory, cache_dir, codec="int8"):
    """Open, pack through the cache, finish; returns (logits, host buffers, cache, reader stats)."""
    opened = open_checkpoint(directory, torch.float32, progress=False)
    opened.model.requires_grad_(False)
    eager_bytes = opened.reader.bytes_read
    cache = PackCache.for_checkpoint(cache_dir, directory, codec, torch.float32, on_hit=opened.reader.skip_layer)
    memory = SimpleNamespace(stream="all", codec=codec, ring_slots=2, prefetch=1, gradient_checkpointing=False)
    placement = place(opened.model, opened.adapter, memory, "cpu", load_tensor=opened.load_tensor, pack_cache=cache)
    layer_bytes = opened.finish()["bytes_read"] - eager_bytes
    with torch.no_grad():
        logits = opened.model(input_ids=IDS, use_cache=False).logits
    buffers = [placement.engine.packs[i].buffer.clone() for i in sorted(placement.engine.packs)]
    placement.close()
    return logits, buffers, cache, layer_bytes


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_second_run_reads_every_layer_from_the_cache_and_matches(ckpt, tmp_path, codec):
    logits, buffers, first, first_layer_bytes = _load(ckpt, tmp_path / "cache", codec)
    assert first.stats()["hits"] == 0 and first.stats()["misses"] == len(buffers)
    assert first.stats()["bytes_written"] == sum(b.numel() for b in buffers) and first_layer_bytes > 0
    logits2, buffers2, second, second_layer_bytes = _load(ckpt, tmp_path / "cache", codec)
    assert second.directory == first.directory
    assert second.stats()["hits"] == len(buffers) and second.stats()["misses"] == 0
    assert second_layer_bytes == 0  # no decoder-layer tensor was read from the shards
    assert all(torch.equal(a, b) for a, b in zip(buffers, buffers2))
    assert torch.equal(logits, logits2)
    assert json.loads((first.directory / "key.json").read_text())["codec"] == codec


def test_a_damaged_layer_is_encoded_again_and_rewritten(ckpt, tmp_path):
    logits, buffers, first, _ = _load(ckpt, tmp_path / "cache")
    flipped = first.directory / "layer-00001.bin"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    (first.directory / "layer-00002.bin").write_bytes(b"short")
    with pytest.warns(UserWarning) as caught:
        logits2, buffers2, second, layer_bytes = _load(ckpt, tmp_path / "cache")
    messages = " ".join(str(w.message) for w in caught)
    assert "layer 1 fails its checksum" in messages and "layer 2 has the wrong size" in messages
    assert second.stats()["hits"] == len(buffers) - 2 and layer_bytes > 0
    assert torch.equal(logits, logits2) and all(torch.equal(a, b) for a, b in zip(buffers, buffers2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, third, _ = _load(ckpt, tmp_path / "cache")  # rewritten: every layer verifies again
    assert third.stats()["hits"] == len(buffers)


def test_changed_checkpoint_or_codec_is_another_entry(ckpt, tmp_path):
    _, _, first, _ = _load(ckpt, tmp_path / "cache")
    _, _, other_codec, _ = _load(ckpt, tmp_path / "cache", codec="nf4")
    assert other_codec.directory != first.directory and other_codec.stats()["hits"] == 0
    shard = shard_paths(ckpt)[-1]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    _, _, touched, _ = _load(ckpt, tmp_path / "cache")
    assert touched.directory != first.directory and touched.stats()["hits"] == 0


def test_another_layout_in_the_same_entry_is_a_miss(ckpt, tmp_path):
    _, _, first, _ = _load(ckpt, tmp_path / "cache")
    meta_path = first.directory / "layer-00000.json"
    meta = json.loads(meta_path.read_text())
    meta["signature"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="layer 0 was packed with another layout"):
        _, _, second, _ = _load(ckpt, tmp_path / "cache")
    assert second.stats()["misses"] == 1


def test_a_left_over_temporary_file_is_ignored(ckpt, tmp_path):
    _, buffers, first, _ = _load(ckpt, tmp_path / "cache")
    (first.directory / "layer-00000.json").unlink()  # as if killed between the data and its sidecar
    (first.directory / "layer-00000.bin.tmp-1").write_bytes(b"partial")
    _, _, second, _ = _load(ckpt, tmp_path / "cache")
    assert second.stats()["hits"] == len(buffers) - 1 and second.stats()["misses"] == 1
    assert (first.directory / "layer-00000.json").is_file()


def test_an_unwritable_cache_warns_and_the_run_goes_on(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = PackCache(blocker / "entry", {"format": 1})
    with pytest.warns(UserWarning, match="could not write layer 0"):
        cache.write(0, "sig", torch.zeros(10, dtype=torch.uint8))
    assert cache.stats()["bytes_written"] == 0 and cache.problems


def test_cache_dir_that_is_a_file_is_an_input_error(ckpt, tmp_path):
    from streamtune.errors import InputError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="memory.cache_dir"):
        PackCache.for_checkpoint(blocker, ckpt, "int8", torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cache_reads_into_pinned_buffers_on_cuda(ckpt, tmp_path):
    def load():
        opened = open_checkpoint(ckpt, torch.float32, progress=False)
        opened.model.requires_grad_(False)
        cache = PackCache.for_checkpoint(tmp_path / "cache", ckpt, "nf4", torch.float32, on_hit=opened.reader.skip_layer)
        memory = SimpleNamespace(stream="all", codec="nf4", ring_slots=2, prefetch=1, gradient_checkpointing=False)
        placement = place(opened.model, opened.adapter, memory, "cuda", load_tensor=opened.load_tensor,
                          pack_cache=cache)
        opened.finish()
        assert all(pack.buffer.is_pinned() for pack in placement.engine.packs.values())
        with torch.no_grad():
            logits = opened.model(input_ids=IDS.cuda(), use_cache=False).logits.cpu()
        placement.close()
        return logits, cache.stats()

    first, first_stats = load()
    second, second_stats = load()
    assert first_stats["hits"] == 0 and second_stats["hits"] == first_stats["misses"] > 0
    assert torch.equal(first, second)

