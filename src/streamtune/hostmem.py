"""Host memory of this process: the resident set now and its peak."""

from __future__ import annotations

import functools
import resource
from pathlib import Path
from typing import Any


def rss_bytes() -> int:
    """Resident set size of this process now (host RAM it holds, pinned buffers included)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set of this process (``VmHWM`` on Linux).

    Not ``ru_maxrss`` where ``VmHWM`` exists: Linux carries ``ru_maxrss`` across ``fork``/``exec``, so a
    child of a parent that once held the whole model would report the parent's size. The kernel updates
    ``VmHWM`` lazily (it can trail the resident set by a few hundred KB), so the result is at least
    :func:`rss_bytes`.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return max(int(line.split()[1]) * 1024, rss_bytes())
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_bytes())


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Problem: after glibc frees a large mapped block it raises its mmap threshold, so later tensors of
    up to 32 MiB come from the heap, and their pages stay resident after ``free`` while packed layer
    buffers sit between them: RSS then counts the transient unpacked layers on top of the packs.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def settle_heap() -> None:
    """Collect garbage cycles, then give the freed heap pages back to the OS (:func:`release_free_heap`).

    Problem: setup and the first step's compiles (Dynamo, Inductor, Triton) leave cycles and freed small
    objects spread over the heap and the allocator's arenas; the pages stay in the process's resident set
    for the whole run, once per rank. Solution: call this once setup is done and once after the first step.
    """
    import gc

    gc.collect()
    release_free_heap()


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc, found once: ``find_library`` runs ``ldconfig`` in a subprocess (about 2 ms), and the loaders
    call :func:`release_free_heap` once per tensor (hundreds of times per model). None where there is none."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
