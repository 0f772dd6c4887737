"""Host memory readings and giving freed heap pages back."""

from __future__ import annotations

import sys

import pytest

from streamtune import hostmem


def test_peak_is_at_least_the_resident_set():
    assert hostmem.peak_rss_bytes() >= hostmem.rss_bytes() > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_heap_finds_libc_once():
    hostmem._libc.cache_clear()
    for _ in range(3):
        hostmem.release_free_heap()
    info = hostmem._libc.cache_info()
    assert hostmem._libc() is not None and info.misses == 1 and info.hits >= 2


def test_settle_heap_collects_cycles_then_trims(monkeypatch):
    import gc
    import weakref

    class Node:
        pass

    trims = []
    monkeypatch.setattr(hostmem, "release_free_heap", lambda: trims.append(gc.isenabled()))
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    alive = weakref.ref(a)
    del a, b
    gc.disable()  # no automatic collection between here and the call
    try:
        assert alive() is not None
        hostmem.settle_heap()
    finally:
        gc.enable()
    assert alive() is None and len(trims) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_arenas_can_be_capped():
    assert hostmem.limit_malloc_arenas(hostmem.MAX_MALLOC_ARENAS)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_malloc_stats_see_a_large_live_allocation():
    import ctypes

    before = hostmem.malloc_stats()
    if before is None:
        pytest.skip("glibc without mallinfo2 (older than 2.33)")
    assert before["in_use_bytes"] + before["free_bytes"] == before["heap_bytes"]
    block = ctypes.create_string_buffer(64 << 20)  # above the mmap threshold: its own mapping
    after = hostmem.malloc_stats()
    assert after["mmapped_bytes"] - before["mmapped_bytes"] >= 64 << 20
    del block


def test_stop_compile_workers_ends_the_pool_and_a_later_compile_may_start_another(monkeypatch):
    import psutil
    import torch._inductor.async_compile as async_compile
    import torch._inductor.config as inductor_config

    from streamtune.hostmem import stop_compile_workers

    monkeypatch.setattr(inductor_config, "compile_threads", 2)
    stop_compile_workers()  # an earlier test's pool, if any
    assert stop_compile_workers() == 0
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    for _ in range(2):  # the cache of the stopped pool is cleared: the second round starts a new one
        pool = async_compile.AsyncCompile.process_pool()
        assert pool.submit(sum, [1, 2]).result() == 3
        workers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert workers
        assert stop_compile_workers() == 1
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, [p.cmdline() for p in alive]


def test_drop_compile_records_clears_what_torch_compile_keeps_for_export():
    import torch._inductor.codecache  # noqa: F401  (registers the inductor artifact type)
    from torch.compiler._cache import CacheArtifactManager

    from streamtune.hostmem import drop_compile_records

    drop_compile_records()  # an earlier test's compiles, if any
    assert drop_compile_records() == 0
    CacheArtifactManager.record_artifact("inductor", "streamtune-test-key", b"x" * 123_456)
    assert CacheArtifactManager.need_serialize()
    assert drop_compile_records() == 123_456
    assert not CacheArtifactManager.need_serialize() and drop_compile_records() == 0
