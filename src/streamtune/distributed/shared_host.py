"""One host copy of the packed weights per host, shared by its local ranks.

Problem: every rank packing its own copy of the frozen weights multiplies host RAM by the number of
GPUs (26B in int8: 24.6 GB per rank). Solution: local rank 0 packs each layer into a file in POSIX
shared memory (``/dev/shm``, or ``STREAMTUNE_SHM_DIR``), mapped ``MAP_SHARED``; once a layer is
written it publishes a small sidecar, and the other local ranks map the same pages (no read, no
encode, no copy) and page-lock them with ``cudaHostRegister`` in their own process. After every
rank has mapped every layer the files are unlinked: the memory lives as long as a mapping does and
is returned by the kernel when the last rank exits, crash or not.

Space is reserved with ``posix_fallocate`` before a layer is written, so a too-small ``/dev/shm``
(containers default to 64 MB) is a clear error instead of a SIGBUS. ``STREAMTUNE_SHARED_HOST=0``
turns sharing off (each rank packs its own copy).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from streamtune.errors import InputError, StreamtuneError

SHM_DIR_ENV = "STREAMTUNE_SHM_DIR"
ENABLE_ENV = "STREAMTUNE_SHARED_HOST"
PREFIX = "streamtune-"
OWNER_FILE = "owner.pid"
POLL_S = 0.02


def shm_root() -> Path:
    """Where shared layer files go: ``STREAMTUNE_SHM_DIR``, else ``/dev/shm``, else the temp dir."""
    if os.environ.get(SHM_DIR_ENV):
        return Path(os.environ[SHM_DIR_ENV])
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def sharing_enabled(ctx: Any) -> bool:
    """Local ranks share one copy when there are several of them and sharing is not turned off."""
    return ctx.local_world_size > 1 and os.environ.get(ENABLE_ENV, "1") != "0"


class SharedHostStore:
    """Layer buffers in shared memory: the owner (local rank 0) writes them, the others map them.

    The ``pack_layer`` protocol: ``buffer(index, signature, nbytes, pin) -> (tensor, filled)``;
    the owner gets an empty buffer and calls ``publish(index, signature)`` once it is packed; the
    others get the owner's bytes (``filled`` True) as soon as they are published.

    Args:
        directory: this job's directory under :func:`shm_root`.
        owner: True on local rank 0.
        owner_pid: the owner's process id (waiting ranks fail fast when it dies).
        timeout_s: longest wait for one layer.
        on_hit: called with a layer index a non-owner mapped (a checkpoint reader then skips it).
    """

    def __init__(self, directory: Path, owner: bool, owner_pid: int, timeout_s: float,
                 on_hit: Callable[[int], None] | None = None):
        self.directory = Path(directory)
        self.owner = owner
        self.owner_pid = owner_pid
        self.timeout_s = timeout_s
        self.on_hit = on_hit
        self.num_layers = 0
        self.nbytes = 0
        self.num_pinned = 0

    def _paths(self, index: int) -> tuple[Path, Path]:
        stem = self.directory / f"layer-{index:05d}"
        return stem.with_suffix(".bin"), stem.with_suffix(".json")

    def buffer(self, index: int, signature: str, nbytes: int, pin: bool) -> tuple[Any, bool]:
        """The shared buffer of layer ``index`` and whether it already holds the packed layer.

        Raises:
            InputError: the shared-memory directory has no room for the layer.
            StreamtuneError: (non-owner) the owner died, timed out, or packed a different layout.
        """
        import torch

        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8), not self.owner
        data_path, meta_path = self._paths(index)
        if self.owner:
            _reserve(data_path, nbytes)
        else:
            self._wait_published(index, meta_path, signature, nbytes)
        buffer = torch.from_file(str(data_path), shared=True, size=nbytes, dtype=torch.uint8)
        if pin:
            self._pin(buffer, index)
        self.num_layers += 1
        self.nbytes += nbytes
        if not self.owner and self.on_hit is not None:
            self.on_hit(index)
        return buffer, not self.owner

    def _pin(self, buffer: Any, index: int) -> None:
        import warnings

        from streamtune.offload.host import _register

        if _register(buffer):
            self.num_pinned += 1
        else:
            warnings.warn(f"shared host copy: cudaHostRegister refused layer {index}'s shared mapping; it streams from "
                          f"pageable memory (several times slower); set {ENABLE_ENV}=0 to give each rank pinned memory",
                          stacklevel=3)

    def publish(self, index: int, signature: str) -> None:
        """(Owner) layer ``index`` is packed: let the other local ranks map it."""
        data_path, meta_path = self._paths(index)
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"signature": signature, "nbytes": data_path.stat().st_size}))
        os.replace(tmp, meta_path)

    def _wait_published(self, index: int, meta_path: Path, signature: str, nbytes: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not meta_path.is_file():
            if not _alive(self.owner_pid):
                raise StreamtuneError(f"local rank 0 (pid {self.owner_pid}) died while packing layer {index} of the "
                                      f"shared host copy; see its log")
            if time.monotonic() > deadline:
                raise StreamtuneError(f"waited {self.timeout_s:.0f} s for local rank 0 to pack layer {index} "
                                      f"(STREAMTUNE_DIST_TIMEOUT_S); it is stalled or far slower than expected")
            time.sleep(POLL_S)
        meta = json.loads(meta_path.read_text())
        if meta["signature"] != signature or int(meta["nbytes"]) != nbytes:
            raise StreamtuneError(f"layer {index}: local rank 0 packed a different layout (codec or model differ "
                                  f"between ranks); every rank must run the same config")

    def unlink(self) -> None:
        """(Owner) remove the files; the mappings of every rank stay valid."""
        if self.owner:
            shutil.rmtree(self.directory, ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "owner": self.owner, "layers": self.num_layers,
                "bytes": self.nbytes, "pinned_layers": self.num_pinned}


def _reserve(path: Path, nbytes: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        free_bytes = shutil.disk_usage(path.parent).free
        raise InputError(
            f"shared host copy: {path.parent} has {free_bytes / 2**30:.1f} GiB free but a layer needs "
            f"{nbytes / 2**30:.2f} GiB more ({exc}); enlarge it (docker --shm-size), point {SHM_DIR_ENV} at a "
            f"larger tmpfs, or set {ENABLE_ENV}=0 to give each rank its own copy"
        ) from exc
    os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(root: Path) -> None:
    """Delete job directories under ``root`` whose owner process is gone (a crash before unlink)."""
    for child in root.glob(PREFIX + "*"):
        try:
            pid = int((child / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not _alive(pid):
            shutil.rmtree(child, ignore_errors=True)


def create_store(ctx: Any, on_hit: Callable[[int], None] | None = None) -> SharedHostStore | None:
    """The job's store on every rank (a collective), or None when sharing is off.

    Each local rank 0 creates a fresh directory; all ranks exchange ``(host, agent, directory, pid)`` and
    take the entry of their own host and torchrun agent (``GROUP_RANK``: two agents on one host each share
    their own copy), so stale directories of earlier jobs are never mapped.

    Raises:
        StreamtuneError: not exactly one local rank 0 for this host and agent (a launcher that sets
            ``LOCAL_RANK`` but no ``GROUP_RANK`` for several groups on one host).
    """
    if not sharing_enabled(ctx):
        return None
    agent = (socket.gethostname(), os.environ.get("GROUP_RANK", "0"))
    entry = None
    if ctx.is_local_main:
        root = shm_root()
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        directory = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
        (directory / OWNER_FILE).write_text(str(os.getpid()))
        entry = (*agent, str(directory), os.getpid())
    entries = ctx.all_gather_object(entry, "exchanging the shared host copy's location")
    owners = [e for e in entries if e is not None and tuple(e[:2]) == agent]
    if len(owners) != 1:
        raise StreamtuneError(f"host {agent[0]}, torchrun agent (GROUP_RANK) {agent[1]}: expected one local rank 0, "
                              f"found {len(owners)}; launch ranks with torchrun, or set {ENABLE_ENV}=0")
    _, _, directory, pid = owners[0]
    return SharedHostStore(Path(directory), ctx.is_local_main, pid, ctx.timeout_s, on_hit)
