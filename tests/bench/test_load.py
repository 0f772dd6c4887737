"""``benchmarks/load_checkpoint.py`` on a tiny checkpoint on the CPU: every row measured, cache rows hit."""

from __future__ import annotations

import json

from streamtune.bench.load import main


def test_load_benchmark_writes_then_loads_each_codec_and_the_cache(tmp_path):
    out = tmp_path / "out.json"
    code = main(["--model", "tiny-gemma4", "--dir", str(tmp_path / "ckpt"), "--codecs", "int8", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "packs"), "--shard-size", "1MB", "--out", str(out)])
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["write_bytes"] == payload["checkpoint_bytes"] > 0
    plain, write, read = payload["rows"]
    assert not plain["from_cache"] and not write["from_cache"] and read["from_cache"]
    assert write["cache"]["bytes_written"] == write["host_bytes"] and write["cache"]["hits"] == 0
    assert read["cache"]["hits"] == 4 and read["cache"]["bytes_read"] == read["host_bytes"]
    assert read["shard_bytes_read"] < plain["shard_bytes_read"]  # only embeddings/norms came from the shards
    for row in payload["rows"]:
        assert row["load_s"] > 0 and row["peak_rss_bytes"] >= row["baseline_rss_bytes"] > 0
        assert row["host_bytes"] < payload["checkpoint_bytes"]  # int8 packs are smaller than the fp32 shards
