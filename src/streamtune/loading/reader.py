"""CheckpointReader: fills a model built on the CPU from safetensors shards, one decoder layer at a time.

Flow: :meth:`CheckpointReader.prepare` resolves every model tensor to its checkpoint tensor(s) and checks
every shape before anything heavy happens, turns each decoder-layer parameter into a zero-byte
placeholder, and reads the rest (embeddings, final norm, untied LM head, persistent buffers) for real.
:meth:`CheckpointReader.load_tensor` is the engine's ``load_tensor`` hook: it gives one parameter real
storage and reads it, several threads at once, just before the engine encodes (and frees) it.
:meth:`CheckpointReader.load_layer` reads a whole layer (plain CPU models).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamtune.errors import InputError
from streamtune.hostmem import release_free_heap
from streamtune.loading import names as nm
from streamtune.loading.shards import ShardSet, TensorInfo

CHUNK_BYTES = 16 * 2**20
SEGMENT_BYTES = 64 * 2**20  # unpacked bytes handed to the encoder at once while the rest is read
MAX_LISTED = 8


@dataclass
class Source:
    """A model tensor and the checkpoint pieces that fill it."""

    model_name: str
    pieces: list[tuple[nm.Piece, TensorInfo]]

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.pieces)


def _placeholder(shape: tuple[int, ...], dtype: Any) -> Any:
    import torch

    return torch.zeros((), dtype=dtype).expand(shape)


def _destination(tensor: Any, piece: nm.Piece) -> Any:
    view = tensor
    if piece.expert is not None:
        view = view[piece.expert]
    if piece.rows is not None:
        view = view[piece.rows[0]:piece.rows[1]]
    return view


class CheckpointReader:
    """Reads a local HF checkpoint directory into a model of the same config.

    Args:
        directory: the checkpoint directory (``*.safetensors`` with or without an index).
        config: its HF config (``config.model_type`` picks the name mapping).
        adapter: its ``ArchAdapter`` (unused today; names the family in messages).
        num_threads: reader threads (default: CPU count, at most 8).
        progress: show a tqdm bar in GB and GB/s (default: when stderr is a terminal).

    Raises:
        InputError: a shard is missing, corrupt or truncated (see :class:`ShardSet`).
    """

    def __init__(self, directory: str | Path, config: Any, adapter: Any = None, num_threads: int | None = None,
                 progress: bool | None = None):
        import sys

        self.directory = Path(directory)
        self.config = config
        self.family = getattr(adapter, "name", None) or getattr(config, "model_type", "")
        self.model_type = getattr(config, "model_type", "")
        self.shards = ShardSet(self.directory)
        self.prefix = nm.text_prefix(set(self.shards.tensors))
        self.skipped = sorted(n for n in self.shards.tensors if nm.is_skipped(n, self.prefix))
        self.unexpected: list[str] = []
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._pending: dict[int, Source] = {}
        self._by_name: dict[tuple[int, str], Source] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._bar: Any = None
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.read_s = 0.0

    # -- resolving names ------------------------------------------------------------------------

    def _resolve(self, model_name: str, options: list[list[nm.Piece]], tensor: Any, problems: list[str]) -> Source | None:
        tensors = self.shards.tensors
        chosen = next((o for o in options if o and all(p.name in tensors for p in o)), None)
        if chosen is None:
            partial = next((o for o in options if any(p.name in tensors for p in o)), options[0])
            missing = next(p for p in partial if p.name not in tensors)
            problems.append(
                f"tensor {missing.name!r} (for {model_name}, expected shape "
                f"{list(_destination(tensor, missing).shape)}) is missing from the checkpoint "
                f"(index: {self.shards.where(missing.name)})")
            return None
        pieces = []
        for piece in chosen:
            info = tensors[piece.name]
            expected = tuple(_destination(tensor, piece).shape)
            if info.shape != expected:
                problems.append(f"tensor {piece.name!r} in shard {info.shard.name} has shape {list(info.shape)}, "
                                f"expected {list(expected)} (for {model_name}); the checkpoint does not match "
                                "its config.json")
            pieces.append((piece, info))
        return Source(model_name, pieces)

    def prepare(self, model: Any) -> None:
        """Check every name and shape, placeholder the decoder layers, load everything else.

        Args:
            model: the stock causal LM of ``config`` built on the CPU (weights uninitialised).

        Raises:
            InputError: tensors missing or of the wrong shape (every problem listed, with its shard).
        """
        from streamtune.models.adapters import decoder_layers

        problems: list[str] = []
        layers = decoder_layers(model)
        layer_ids: set[int] = set()
        for index, layer in enumerate(layers):
            for name, param in layer.named_parameters():
                layer_ids.add(id(param))
                options = nm.candidates(self.model_type, name, tuple(param.shape), f"{self.prefix}layers.{index}.")
                source = self._resolve(f"layers.{index}.{name}", options, param, problems)
                if source is not None:
                    self._pending[id(param)] = source
                    self._by_name[(index, name)] = source
        eager = self._eager_sources(model, layer_ids, problems)
        if problems:
            shown = "\n  - ".join(problems[:MAX_LISTED])
            more = f"\n  (+{len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
            raise InputError(f"checkpoint {self.directory} does not fit the {self.family} model of its "
                             f"config.json:\n  - {shown}{more}")
        self._list_unexpected(eager)
        for index, layer in enumerate(layers):
            for param in layer.parameters():
                param.data = _placeholder(tuple(param.shape), param.dtype)
        self._read([(tensor, source) for tensor, source in eager])

    def _eager_sources(self, model: Any, layer_ids: set[int], problems: list[str]) -> list[tuple[Any, Source]]:
        """Everything but decoder-layer parameters: embeddings, norm, untied head, persistent buffers."""
        out, seen = [], set(layer_ids)
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            options = [[nm.Piece(nm.full_name(name, self.prefix))]]
            source = self._resolve(name, options, tensor, problems)
            if source is not None:
                out.append((tensor, source))
        return out

    def _list_unexpected(self, eager: list[tuple[Any, Source]]) -> None:
        used = {p.name for s in [*self._pending.values(), *(s for _, s in eager)] for p, _ in s.pieces}
        skipped = set(self.skipped)
        self.unexpected = sorted(n for n in self.shards.tensors if n not in used and n not in skipped)
        if self.unexpected:
            shown = ", ".join(self.unexpected[:MAX_LISTED])
            more = f" (+{len(self.unexpected) - MAX_LISTED} more)" if len(self.unexpected) > MAX_LISTED else ""
            warnings.warn(f"checkpoint {self.directory}: {len(self.unexpected)} tensor(s) not used by the "
                          f"{self.family} model: {shown}{more}", stacklevel=3)

    # -- reading --------------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes still to read for the decoder layers."""
        return sum(s.nbytes for s in self._pending.values())

    def load_layer(self, index: int, layer: Any) -> None:
        """Give decoder layer ``index``'s placeholder parameters real CPU storage and read them.

        Parameters are matched by identity (names may carry PEFT's ``base_layer``); LoRA parameters
        are not placeholders and are left alone.

        Raises:
            InputError: a shard ended early while reading.
        """
        release_free_heap()  # the previous layer's unpacked weights and codec temporaries
        jobs = [job for name, param in layer.named_parameters(remove_duplicate=False)
                if (job := self._job(index, name, param)) is not None]
        self._read(jobs)
        if not self._pending:
            self.close_progress()

    def load_tensor(self, index: int, name: str, param: Any, out: Any = None, segment_numel: int | None = None,
                    consume: Any = None) -> None:
        """Read one placeholder parameter of decoder layer ``index`` (the engine's per-tensor hook).

        Without ``out`` the parameter gets CPU storage holding its values; the engine encodes it right
        after, so host RAM holds one unpacked tensor at a time. With ``out`` (a CPU tensor of the
        parameter's shape, e.g. its place in a packed host buffer) the values are read straight into
        ``out``, converted chunk by chunk when the checkpoint's dtype differs, and the parameter stays
        a placeholder: no unpacked copy at all.

        With ``consume`` (and ``segment_numel``), ``consume(start, stop)`` is called in this thread
        for consecutive element ranges of the flattened parameter, multiples of ``segment_numel``
        (the last one ends at the tensor's end), each as soon as every element before ``stop`` has
        been read, while the reader threads go on with the rest: the caller encodes the first
        segments of a tensor while the disk delivers the next ones.

        Raises:
            InputError: a shard ended early while reading.
        """
        release_free_heap()  # the previous tensor's unpacked copy and codec temporaries
        job = self._job(index, name, param, out)
        if job is not None and consume is not None:
            self._read_in_order(job, segment_numel or 1, consume)
        elif job is not None:
            self._read([job])
        if not self._pending:
            self.close_progress()

    def skip_layer(self, index: int) -> None:
        """Stop waiting for decoder layer ``index``: its packed bytes came from elsewhere (the pack cache)."""
        skipped = {id(source) for (layer, _), source in self._by_name.items() if layer == index}
        self._pending = {pid: source for pid, source in self._pending.items() if id(source) not in skipped}
        if not self._pending:
            self.close_progress()

    def _job(self, index: int, name: str, param: Any, out: Any = None) -> tuple[Any, Source] | None:
        """(destination, source) of a placeholder parameter, or None when it is not one.

        The destination is ``out`` when given, else new CPU storage given to the parameter.
        """
        import torch

        source = self._pending.pop(id(param), None)
        if source is None and param.data.numel() > 1 and all(s == 0 for s in param.data.stride()):
            source = self._by_name.get((index, nm.stock_name(name)))
        if source is None:
            return None
        if out is not None:
            return out, source
        param.data = torch.empty(tuple(param.shape), dtype=param.dtype)
        return param.data, source

    def _chunks(self, jobs: list[tuple[Any, Source]]) -> list[tuple[TensorInfo, int, Any]]:
        """``(shard tensor, first element, destination view)`` per read of at most ``CHUNK_BYTES``."""
        chunks = []
        for tensor, source in jobs:
            for piece, info in source.pieces:
                flat = _destination(tensor.detach(), piece).reshape(-1)
                step = max(1, CHUNK_BYTES // flat.element_size())
                for start in range(0, flat.numel(), step):
                    chunks.append((info, start, flat[start:start + step]))
        return chunks

    def _start(self, chunks: list[tuple[TensorInfo, int, Any]]) -> None:
        if self._bar is None and self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_bytes + sum(c[2].numel() for c in chunks), unit="B",
                             unit_scale=True, unit_divisor=1000, desc="loading weights", leave=False)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="streamtune-load")

    def _read(self, jobs: list[tuple[Any, Source]]) -> None:
        chunks = self._chunks(jobs)
        if not chunks:
            return
        self._start(chunks)
        started = time.perf_counter()
        for _ in self._pool.map(self._read_chunk, chunks):
            pass
        self.read_s += time.perf_counter() - started

    def _read_in_order(self, job: tuple[Any, Source], segment_numel: int, consume: Any) -> None:
        """Read one tensor in element order, handing each finished segment to ``consume`` (see load_tensor)."""
        tensor = job[0]
        base_ptr, item_bytes, numel = tensor.data_ptr(), tensor.element_size(), tensor.numel()
        # every piece is a contiguous element range of the tensor: order the reads by position
        chunks = sorted(self._chunks([job]), key=lambda chunk: chunk[2].data_ptr())
        self._start(chunks)
        started = time.perf_counter()
        futures = [self._pool.submit(self._read_chunk, chunk) for chunk in chunks]
        firsts = [(chunk[2].data_ptr() - base_ptr) // item_bytes for chunk in chunks]
        step = max(1, SEGMENT_BYTES // item_bytes // segment_numel) * segment_numel
        waited = 0
        try:
            for start in range(0, numel, step):
                stop = min(start + step, numel)
                while waited < len(futures) and firsts[waited] < stop:  # every read that lands before stop
                    futures[waited].result()
                    waited += 1
                consume(start, stop)
        finally:
            for future in futures[waited:]:  # never leave reads running into a tensor given up on
                future.cancel() or future.exception()
        self.read_s += time.perf_counter() - started

    def _read_chunk(self, chunk: tuple[TensorInfo, int, Any]) -> None:
        import torch

        info, start, out = chunk
        item_bytes = torch.empty((), dtype=info.dtype).element_size()
        if out.dtype == info.dtype:
            self.shards.read_into(info, start * item_bytes, out)
        else:
            staging = torch.empty(out.numel(), dtype=info.dtype)
            self.shards.read_into(info, start * item_bytes, staging)
            out.copy_(staging)
        nbytes = out.numel() * item_bytes
        with self._lock:
            self.bytes_read += nbytes
            if self._bar is not None:
                self._bar.update(nbytes)

    def load_all(self, model: Any) -> None:
        """Read every decoder layer now (no streaming engine): a plain model on the CPU."""
        from streamtune.models.adapters import decoder_layers

        for index, layer in enumerate(decoder_layers(model)):
            self.load_layer(index, layer)

    @property
    def pending_layers(self) -> int:
        """How many decoder-layer tensors are still placeholders."""
        return len(self._pending)

    def stats(self) -> dict[str, float]:
        """``bytes_read``, ``read_s`` and ``gbps`` (10^9 bytes/s) so far."""
        gbps = self.bytes_read / self.read_s / 1e9 if self.read_s > 0 else 0.0
        return {"bytes_read": self.bytes_read, "read_s": self.read_s, "gbps": gbps}

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Close the progress bar, the reader threads and the shard files."""
        release_free_heap()
        self.close_progress()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.shards.close()
