"""The safetensors shards of a checkpoint directory: headers parsed up front, tensors read by ``pread``.

Problem: ``safe_open`` memory-maps each shard, so every byte read stays in the process's resident set
(file-backed pages) until the shard is closed, and a tensor is copied once more out of the map.
Solution: parse each shard's JSON header ourselves (validating it against the file size, which also
catches truncated shards before any heavy work) and read tensor bytes with ``os.preadv`` straight into
their destination tensor, in chunks that release the GIL, so several threads keep the disk busy.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamtune.errors import InputError

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk.

    Attributes:
        name: checkpoint name.
        shard: the shard file.
        dtype: torch dtype of the stored bytes.
        shape: stored shape.
        offset_bytes: absolute file offset of the first byte.
        nbytes: stored size.
    """

    name: str
    shard: Path
    dtype: Any
    shape: tuple[int, ...]
    offset_bytes: int
    nbytes: int


def _element_size(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def read_header(shard: Path) -> dict[str, TensorInfo]:
    """Parse and validate one shard's header.

    Raises:
        InputError: the file is not a safetensors file, its header is corrupt, or it is truncated
            (the message names the shard and what is wrong).
    """
    import torch

    size_bytes = shard.stat().st_size
    with open(shard, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InputError(f"checkpoint shard {shard}: truncated ({size_bytes} bytes, no safetensors header); "
                             "re-download the file")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(MAX_HEADER_BYTES, size_bytes - 8):
            raise InputError(f"checkpoint shard {shard}: corrupt or truncated header (declares {header_bytes} "
                             f"header bytes, the file has {size_bytes}); re-download the file")
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"checkpoint shard {shard}: corrupt safetensors header ({exc}); re-download the file") from exc
    data_start = 8 + header_bytes
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = getattr(torch, _DTYPES[entry["dtype"]])
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"checkpoint shard {shard}: corrupt header entry for tensor {name!r} ({exc!r}); "
                             "re-download the file") from exc
        if end - begin != _numel(shape) * _element_size(dtype) or begin < 0:
            raise InputError(f"checkpoint shard {shard}: corrupt header entry for tensor {name!r} (offsets "
                             f"{begin}..{end} do not hold shape {list(shape)} of {entry['dtype']})")
        if data_start + end > size_bytes:
            raise InputError(f"checkpoint shard {shard}: truncated (tensor {name!r} ends at byte {data_start + end}, "
                             f"the file has {size_bytes}); re-download the file")
        out[name] = TensorInfo(name, shard, dtype, shape, data_start + begin, end - begin)
    return out


def shard_files(directory: Path) -> list[Path]:
    """The shard files of a checkpoint: those its index names, else every ``*.safetensors``.

    Raises:
        InputError: no shards, a corrupt index, or a shard named by the index is missing.
    """
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"checkpoint index {index_path}: not a valid safetensors index ({exc!r})") from exc
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise InputError(f"checkpoint index {index_path} names shard(s) {missing} that are not in {directory}; "
                             "the download is incomplete")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InputError(f"model.name: {str(directory)!r} holds no *.safetensors weights")
    return files


def index_map(directory: Path) -> dict[str, str]:
    """``tensor name -> shard file name`` from the index (empty without one)."""
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        return {}
    return dict(json.loads(index_path.read_text())["weight_map"])


class ShardSet:
    """Every tensor of a checkpoint directory, by name, with open file descriptors for reading.

    Raises:
        InputError: see :func:`read_header` and :func:`shard_files`; a tensor in two shards.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = shard_files(self.directory)
        self.index = index_map(self.directory)
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.files:
            for name, info in read_header(shard).items():
                if name in self.tensors:
                    raise InputError(f"checkpoint {self.directory}: tensor {name!r} is in both "
                                     f"{self.tensors[name].shard.name} and {shard.name}")
                self.tensors[name] = info
        self._fds: dict[Path, int] = {}

    def where(self, name: str) -> str:
        """Which shard the index says holds ``name`` (for error messages)."""
        if name in self.tensors:
            return self.tensors[name].shard.name
        return self.index.get(name, "no shard")

    def fd(self, shard: Path) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(shard, os.O_RDONLY)
        return self._fds[shard]

    def read_into(self, info: TensorInfo, offset_bytes: int, out: Any) -> None:
        """Read ``out.nbytes`` bytes of ``info`` starting ``offset_bytes`` into it into ``out`` (contiguous).

        Raises:
            InputError: the shard ended early (changed or truncated since it was opened).
        """
        view = memoryview(out.view(-1).view(_uint8()).numpy())
        fd = self.fd(info.shard)
        position = info.offset_bytes + offset_bytes
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], position + done)
            if n <= 0:
                raise InputError(f"checkpoint shard {info.shard}: truncated while reading tensor {info.name!r} "
                                 f"(ended at byte {position + done}); re-download the file")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _uint8() -> Any:
    import torch

    return torch.uint8
