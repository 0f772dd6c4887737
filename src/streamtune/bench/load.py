"""``benchmarks/load_checkpoint.py``: load a saved checkpoint into the engine at each codec.

Writes a random checkpoint of a preset with ``save_pretrained`` (sharded, like a download) unless
the directory already holds one, then per codec, each in a fresh child process with a cold page
cache: open the checkpoint, pack every layer (read, convert, encode, pin), and report wall time,
GB/s of checkpoint bytes, peak host RAM (``ru_maxrss``) against the bound (packed bytes + the
eager tensors + the largest tensor), and with ``--cache-dir`` the same load again from the pack cache.

    python benchmarks/load_checkpoint.py --dir /data/g4 --codecs bf16,int8,nf4 --cache-dir /data/packs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GB = 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma4-26b-a4b", help="preset written when --dir holds no checkpoint")
    parser.add_argument("--dir", required=True, help="checkpoint directory (written first when empty)")
    parser.add_argument("--codecs", default="bf16,int8,nf4")
    parser.add_argument("--cache-dir", default=None, help="also time a pack-cache write and a read (last codec)")
    parser.add_argument("--device", default="cuda", help="cuda (pinned buffers) or cpu")
    parser.add_argument("--shard-size", default="5GB")
    parser.add_argument("--out", default=None, help="JSON results (rewritten after each codec)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-cache", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_checkpoint(preset: str, directory: Path, shard_size: str) -> dict[str, Any]:
    """Save ``preset`` with random bf16 weights to ``directory``; returns bytes and seconds."""
    from streamtune.bench.common import build_random_model
    from streamtune.models.presets import preset_config

    model = build_random_model(preset_config(preset))
    started = time.perf_counter()
    model.save_pretrained(str(directory), max_shard_size=shard_size)
    del model
    num_bytes = checkpoint_bytes(directory)
    seconds = time.perf_counter() - started
    print(f"[load] wrote {num_bytes / GB:.1f} GB in {seconds:.1f} s ({num_bytes / seconds / GB:.2f} GB/s)", flush=True)
    return {"write_bytes": num_bytes, "write_s": seconds}


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def drop_page_cache(paths: list[Path]) -> str:
    """Evict ``paths`` from the page cache so the next read comes from the disk; says how."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        pass
    for path in paths:  # clean pages of a file can always be dropped by its reader
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def load_once(directory: Path, codec: str, device: str, cache_dir: str | None) -> dict[str, Any]:
    """Open ``directory`` and pack every layer in ``codec`` (this process); the measurements."""
    import torch

    from streamtune.hostmem import peak_rss_bytes, rss_bytes
    from streamtune.loading import open_checkpoint
    from streamtune.loading.cache import PackCache
    from streamtune.models.adapters import decoder_layers
    from streamtune.models.build import build_empty, resolve_config
    from streamtune.offload import StreamEngine

    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context is part of the baseline, not of loading
    build_empty(resolve_config(str(directory)), torch.bfloat16, device="meta")  # imports, not loading
    baseline_rss = rss_bytes()
    started = time.perf_counter()
    opened = open_checkpoint(directory, torch.bfloat16, progress=False)
    opened.model.requires_grad_(False)
    eager_bytes = opened.reader.bytes_read
    largest_bytes = max(p.numel() * p.element_size() for p in opened.model.parameters())
    cache = None
    if cache_dir:
        cache = PackCache.for_checkpoint(cache_dir, directory, codec, torch.bfloat16,
                                         on_hit=opened.reader.skip_layer)
    num_layers = len(decoder_layers(opened.model))
    engine = StreamEngine(opened.model, device, streamed=list(range(num_layers)), codec=codec,
                          load_tensor=opened.load_tensor, pack_cache=cache)
    stats = opened.finish()
    seconds = time.perf_counter() - started
    peak_rss = peak_rss_bytes()
    num_bytes = checkpoint_bytes(directory)
    row = {"codec": codec, "from_cache": bool(cache and cache.num_hits), "load_s": seconds,
           "checkpoint_gbps": num_bytes / seconds / GB, "shard_bytes_read": stats["bytes_read"],
           "shard_read_gbps": stats["gbps"], "host_bytes": engine.host_bytes, "eager_bytes": eager_bytes,
           "largest_tensor_bytes": largest_bytes, "baseline_rss_bytes": baseline_rss, "peak_rss_bytes": peak_rss,
           "bound_bytes": baseline_rss + engine.host_bytes + eager_bytes + largest_bytes,
           "pinned": bool(engine.packs[0].buffer.is_pinned()) if device.startswith("cuda") else False}
    if cache is not None:
        row["cache"] = {**cache.stats(), "directory": str(cache.directory), "problems": cache.problems}
    engine.close()
    return row


def child_main(args: argparse.Namespace) -> int:
    row = load_once(Path(args.dir), args.child, args.device, args.cache_dir if args.child_cache else None)
    print("[load-row] " + json.dumps(row), flush=True)
    return 0


def run_child(args: argparse.Namespace, codec: str, with_cache: bool) -> dict[str, Any]:
    drop = drop_page_cache(sorted(Path(args.dir).glob("*")) + _cache_files(args.cache_dir))
    command = [sys.executable, "-m", "streamtune.bench.load", "--dir", args.dir, "--child", codec,
               "--device", args.device] + (["--cache-dir", args.cache_dir, "--child-cache"] if with_cache else [])
    done = subprocess.run(command, capture_output=True, text=True)
    rows = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("[load-row] ")]
    if done.returncode != 0 or not rows:
        return {"codec": codec, "error": (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]}
    return {**rows[0], "page_cache": drop}


def _cache_files(cache_dir: str | None) -> list[Path]:
    return sorted(p for p in Path(cache_dir).rglob("*.bin")) if cache_dir and Path(cache_dir).is_dir() else []


def print_row(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"{row['codec']:<6} error: {row['error']}", flush=True)
        return
    source = "cache" if row["from_cache"] else "shards"
    print(f"{row['codec']:<6} {source:<7} {row['load_s']:7.1f} s {row['checkpoint_gbps']:6.2f} GB/s  "
          f"host {row['host_bytes'] / GB:6.2f} GB  peak RSS {row['peak_rss_bytes'] / GB:6.2f} GB "
          f"(bound {row['bound_bytes'] / GB:6.2f} GB)  pinned {row['pinned']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    directory = Path(args.dir)
    payload: dict[str, Any] = {"model": args.model, "dir": str(directory), "rows": []}
    if not (directory / "config.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        payload.update(write_checkpoint(args.model, directory, args.shard_size))
    payload["checkpoint_bytes"] = checkpoint_bytes(directory)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    runs = [(codec, False) for codec in codecs]
    if args.cache_dir:
        runs += [(codecs[-1], True), (codecs[-1], True)]  # the first writes the cache, the second reads it
    for codec, with_cache in runs:
        free_bytes = shutil.disk_usage(directory).free
        payload.setdefault("disk_free_bytes", []).append(free_bytes)
        row = run_child(args, codec, with_cache)
        payload["rows"].append(row)
        print_row(row)
        if args.out:
            Path(args.out).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
