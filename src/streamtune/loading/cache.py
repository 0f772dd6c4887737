"""On-disk cache of packed decoder layers: the second run of a checkpoint starts at disk speed.

Problem: encoding a 25 B model into int8 or nf4 reads 50 GB of bf16 shards and spends minutes of
CPU time per run, for bytes that are the same every time. Solution: after a layer is packed, its
host buffer (exactly what the engine streams) is written to ``<cache_dir>/<entry>/layer-NNNNN.bin``.
The next run reads it straight into the (pinned) host buffer, verifies it and skips both the shard
read and the encode.

Keying and verification:
  - the entry directory is named by a SHA-256 over the checkpoint's files (name, size, mtime and
    the safetensors headers of every shard, config.json, the index), the codec, the model dtype,
    the cache format and the streamtune version: a changed file, codec or encoder is a different entry;
  - every layer file has a JSON sidecar with the layer's layout signature (every tensor's name,
    shape, dtype, codec and part offsets), its size and a CRC-32 per 64 MiB chunk; a layer whose
    sidecar, size or checksums do not match is encoded again from the shards and rewritten;
  - files are written to a temporary name, fsynced and renamed: a killed run leaves no half file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from streamtune.files import atomic_write_bytes

FORMAT_VERSION = 1
CHUNK_BYTES = 64 * 2**20
KEY_FILE = "key.json"


def check_cache_root(cache_dir: str | Path) -> Path:
    """The cache root ``cache_dir`` (expanded); it may not exist yet.

    Raises:
        InputError: ``cache_dir`` exists and is not a directory.
    """
    from streamtune.errors import InputError

    root = Path(cache_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise InputError(f"memory.cache_dir: {root} exists and is not a directory; point it at a directory")
    return root


def checkpoint_fingerprint(directory: str | Path) -> list[list[Any]]:
    """``[name, size, mtime_ns, sha256 of the safetensors header]`` of every file that defines the weights.

    Covers config.json, the shard index and every ``*.safetensors`` file of ``directory``; reading
    a header costs one small read per shard, not a pass over the weights.
    """
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json")))
    out = []
    for path in files:
        stat = path.stat()
        out.append([path.name, stat.st_size, stat.st_mtime_ns, _header_digest(path)])
    return out


def _header_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        if path.suffix != ".safetensors":
            return hashlib.sha256(handle.read()).hexdigest()
        prefix = handle.read(8)
        header_bytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        return hashlib.sha256(prefix + handle.read(min(header_bytes, 100 * 2**20))).hexdigest()


class PackCache:
    """Packed host buffers of decoder layers on disk, for one checkpoint, codec and dtype.

    The engine calls :meth:`read_into` before it packs a layer and :meth:`write` after it packed
    one that was not there (see ``streamtune.offload.host.pack_layer``).

    Args:
        directory: this entry's directory (created on first write).
        key: the fields the entry is keyed by (written to ``key.json`` for people reading the cache).
        on_hit: called with the layer index when a layer came from the cache (the checkpoint reader
            then no longer waits for that layer's tensors).
        num_threads: reader/checksum threads.
    """

    def __init__(self, directory: str | Path, key: dict[str, Any], on_hit: Callable[[int], None] | None = None,
                 num_threads: int | None = None):
        self.directory = Path(directory)
        self.key = key
        self.on_hit = on_hit
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        self.num_hits = 0
        self.num_misses = 0
        self.bytes_read = 0
        self.read_s = 0.0
        self.bytes_written = 0
        self.write_s = 0.0
        self.problems: list[str] = []

    @classmethod
    def for_checkpoint(cls, cache_dir: str | Path, checkpoint_dir: str | Path, codec: str, dtype: Any,
                       on_hit: Callable[[int], None] | None = None) -> "PackCache":
        """The cache entry of ``checkpoint_dir`` packed with ``codec`` for a model in ``dtype``.

        Raises:
            InputError: ``cache_dir`` exists and is not a directory.
        """
        from streamtune import __version__

        root = check_cache_root(cache_dir)
        checkpoint_dir = Path(checkpoint_dir).expanduser().resolve()
        key = {"format": FORMAT_VERSION, "streamtune": __version__, "codec": codec,
               "dtype": str(dtype).removeprefix("torch."), "checkpoint": str(checkpoint_dir),
               "files": checkpoint_fingerprint(checkpoint_dir)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return cls(root / f"{checkpoint_dir.name}-{codec}-{digest}", key, on_hit)

    def _paths(self, index: int) -> tuple[Path, Path]:
        stem = self.directory / f"layer-{index:05d}"
        return stem.with_suffix(".bin"), stem.with_suffix(".json")

    def read_into(self, index: int, signature: str, buffer: Any) -> bool:
        """Fill ``buffer`` (uint8 CPU tensor) with layer ``index`` if the cache holds it intact.

        Returns:
            True on a verified hit (``on_hit`` was called); False when the layer is absent or does
            not verify (the reason is kept in :attr:`problems` and warned once per layer).
        """
        data_path, meta_path = self._paths(index)
        if not meta_path.is_file():
            self.num_misses += 1
            return False
        started = time.perf_counter()
        problem = self._verify_read(data_path, meta_path, signature, buffer)
        if problem is not None:
            self.num_misses += 1
            self.problems.append(f"layer {index}: {problem}")
            warnings.warn(f"streamtune pack cache {self.directory}: layer {index} {problem}; encoding it again",
                          stacklevel=2)
            return False
        self.read_s += time.perf_counter() - started
        self.bytes_read += buffer.numel()
        self.num_hits += 1
        if self.on_hit is not None:
            self.on_hit(index)
        return True

    def _verify_read(self, data_path: Path, meta_path: Path, signature: str, buffer: Any) -> str | None:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            return f"has an unreadable sidecar ({exc})"
        nbytes = buffer.numel()
        if meta.get("format") != FORMAT_VERSION or meta.get("signature") != signature:
            return "was packed with another layout (model, LoRA targets or codec policy changed)"
        if meta.get("nbytes") != nbytes or not data_path.is_file() or data_path.stat().st_size != nbytes:
            return f"has the wrong size (expected {nbytes} bytes)"
        crcs = self._parallel(data_path, buffer, read=True)
        if crcs != meta.get("crc32"):
            bad = sum(a != b for a, b in zip(crcs, meta.get("crc32") or []))
            return f"fails its checksum ({bad} of {len(crcs)} chunks differ)"
        return None

    def write(self, index: int, signature: str, buffer: Any) -> None:
        """Store layer ``index``'s packed ``buffer`` atomically (data first, then its sidecar).

        A full disk or an unwritable directory is warned about, not raised: the run goes on uncached.
        """
        data_path, meta_path = self._paths(index)
        started = time.perf_counter()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            key_path = self.directory / KEY_FILE
            if not key_path.is_file():
                atomic_write_bytes(key_path, json.dumps(self.key, indent=1).encode())
            tmp = data_path.with_name(f"{data_path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as handle:
                handle.truncate(buffer.numel())
            crcs = self._parallel(tmp, buffer, read=False)
            _fsync_path(tmp)
            os.replace(tmp, data_path)
            meta = {"format": FORMAT_VERSION, "index": index, "signature": signature,
                    "nbytes": buffer.numel(), "chunk_bytes": CHUNK_BYTES, "crc32": crcs}
            atomic_write_bytes(meta_path, json.dumps(meta).encode())
        except OSError as exc:
            self.problems.append(f"layer {index}: not cached ({exc})")
            warnings.warn(f"streamtune pack cache {self.directory}: could not write layer {index}: {exc}", stacklevel=2)
            return
        self.write_s += time.perf_counter() - started
        self.bytes_written += buffer.numel()

    def _parallel(self, path: Path, buffer: Any, read: bool) -> list[int]:
        """Read ``path`` into ``buffer`` (or write ``buffer`` to it) by chunks on threads; CRC-32 per chunk."""
        view = memoryview(buffer.numpy())
        starts = list(range(0, len(view), CHUNK_BYTES))
        fd = os.open(path, os.O_RDONLY if read else os.O_WRONLY)
        try:
            move = functools.partial(_move_chunk, fd, view, read)
            with ThreadPoolExecutor(self.num_threads, thread_name_prefix="streamtune-cache") as pool:
                return list(pool.map(move, starts))
        finally:
            os.close(fd)

    def stats(self) -> dict[str, float]:
        """Hits, misses, bytes and GB/s of cache reads and writes so far."""
        return {"hits": self.num_hits, "misses": self.num_misses, "bytes_read": self.bytes_read,
                "read_gbps": self.bytes_read / self.read_s / 1e9 if self.read_s > 0 else 0.0,
                "bytes_written": self.bytes_written,
                "write_gbps": self.bytes_written / self.write_s / 1e9 if self.write_s > 0 else 0.0}


def _move_chunk(fd: int, view: memoryview, read: bool, start: int) -> int:
    """Read (or write) bytes ``start .. start + CHUNK_BYTES`` of ``view`` at the same file offset; their CRC-32."""
    chunk = view[start:start + CHUNK_BYTES]
    done = 0
    while done < len(chunk):
        moved = (os.preadv if read else os.pwritev)(fd, [chunk[done:]], start + done)
        if moved <= 0:
            raise OSError(f"short {'read' if read else 'write'} at byte {start + done}")
        done += moved
    return zlib.crc32(chunk)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
