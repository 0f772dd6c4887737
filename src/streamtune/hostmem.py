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
    for the whole run, once per rank. Solution: call this once setup is done and once after the first step (the
    trainer then trims alone after the second step and after each between-step collection).
    """
    import gc

    gc.collect()
    release_free_heap()


COMPILE_THREADS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"


def default_compile_workers() -> int:
    """The size of Inductor's compile-worker pool when nothing sets it: ``min(32, usable cores)``."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(32, cores)


def compile_workers_per_process(local_ranks: int = 1) -> int:
    """Inductor compile workers each of ``local_ranks`` processes on a host starts: ``TORCHINDUCTOR_COMPILE_THREADS``
    when set (by the user, or by ``streamtune.distributed.context.share_compile_workers`` in a torchrun rank), else
    its share of the default pool (what ``share_compile_workers`` gives each rank; the whole pool for one process)."""
    import os

    value = os.environ.get(COMPILE_THREADS_ENV, "")
    if value.isdigit():
        return int(value)
    return max(1, default_compile_workers() // max(1, local_ranks))


def stop_compile_workers() -> int:
    """Stop Inductor's compile-worker pools; returns how many were running (0 when nothing compiled yet).

    Problem: the first compile starts a pool of ``min(32, cores)`` worker processes (``cores // N`` per rank
    under torchrun) that stays for the whole run. They are the ranks' children: on two H200s (26B preset,
    int8) the ranks' process trees held 1.4-2.6 GB more PSS than the two ranks themselves after the first
    steps.
    Solution: stop them once the warm-up steps have compiled; a later compile (a new shape, an evaluation)
    starts a fresh pool, which the next call stops again.
    """
    import sys

    async_compile = sys.modules.get("torch._inductor.async_compile")
    shutdown = getattr(async_compile, "shutdown_compile_workers", None)
    num_pools = len(getattr(async_compile, "_pool_set", ()))
    if shutdown is None or not num_pools:
        return 0
    shutdown()
    return num_pools


def drop_compile_records() -> int:
    """Drop the copies of compile artifacts that ``torch.compile`` keeps in memory for export; returns their bytes.

    Problem: each compile records its cache artifacts (the pickled Inductor graph, the AOTAutograd entry, Triton
    kernel bundles) in ``torch.compiler``'s in-memory "mega-cache", kept for the whole process only so that
    ``torch.compiler.save_cache_artifacts`` can export them; once per rank (session 12: 141 MB of a GPU rank's
    Python heap was allocated in Inductor's ``codecache.py``, where cached graphs are read and recorded).
    Solution: clear that record once the warm-up steps have compiled. The compiled code and the on-disk caches
    stay; a program that wants ``save_cache_artifacts`` calls it before. No-op on a torch without it.
    """
    import sys
    from itertools import chain

    cache = sys.modules.get("torch.compiler._cache")
    manager = getattr(cache, "CacheArtifactManager", None)
    records = getattr(manager, "_new_cache_artifacts", None)
    if manager is None or records is None:
        return 0
    num_bytes = sum(len(content) for content in (getattr(a, "content", None) for a in chain(*records.values()))
                    if isinstance(content, (bytes, bytearray)))
    manager.clear()
    return num_bytes


def malloc_stats() -> dict[str, int] | None:
    """glibc's malloc counters now (``mallinfo2``), or None where there are none (not glibc, or glibc < 2.33).

    ``heap_bytes``: taken from the OS by the arenas (brk heap and arena mappings); ``in_use_bytes`` of it hold
    live allocations and ``free_bytes`` are free chunks between them (``malloc_trim`` gives their whole pages
    back to the OS, yet they stay counted here; compare with the ``[heap]`` mapping's resident size);
    ``mmapped_bytes``: large allocations served by their own mappings. A resident heap that is mostly free is
    fragmentation; one mostly in use is live data (then see who allocates it).
    """
    import ctypes

    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None

    class _Mallinfo2(ctypes.Structure):  # struct mallinfo2 (malloc.h): ten size_t counters
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return {"heap_bytes": int(info.arena), "in_use_bytes": int(info.uordblks), "free_bytes": int(info.fordblks),
            "mmapped_bytes": int(info.hblkhd)}


# glibc mallopt parameter number of M_ARENA_MAX (malloc.h)
_M_ARENA_MAX = -8
MAX_MALLOC_ARENAS = 2


def limit_malloc_arenas(max_arenas: int = MAX_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for the rest of the process (``mallopt(M_ARENA_MAX)``); True if set.

    Problem: glibc gives each thread that allocates its own arena, up to 8 per core (CUDA driver threads,
    the pinned-memory and NCCL threads, Inductor's compile threads), and each arena keeps the pages of its
    freed objects; one rank of the 26B preset on two H200s held 1.17 GB of malloc heap besides its tensors,
    once per rank. Solution tried: a few shared arenas (the Python side allocates under the GIL anyway). Call it
    before the threads start: arenas that exist already stay. Measured once since (2-layer cut, two H200s):
    1.06 / 1.18 GB of heap per rank, so the arenas were not where that heap is.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, int(max_arenas)))


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
