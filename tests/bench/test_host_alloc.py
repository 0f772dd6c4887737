"""benchmarks/host_alloc.py: Python allocations traced after placement, summed by package."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import host_alloc  # noqa: E402


def test_files_are_named_by_their_most_specific_package():
    site = "/opt/venv/lib/python3.12/site-packages"
    assert host_alloc.package_of(f"{site}/torch/_inductor/codecache.py") == "torch/_inductor"
    assert host_alloc.package_of(f"{site}/torch/nn/modules/module.py") == "torch"
    assert host_alloc.package_of("/repo/src/streamtune/offload/engine.py") == "streamtune"
    assert host_alloc.package_of("<frozen importlib._bootstrap>") == "<frozen>"
    assert host_alloc.package_of("/usr/lib/python3.12/json/decoder.py") == "other"
    sizes = {f"{site}/torch/_inductor/a.py": 5, f"{site}/torch/_inductor/b.py": 4, f"{site}/triton/c.py": 7}
    assert host_alloc.by_package(sizes) == [("torch/_inductor", 9), ("triton", 7)]


def test_report_names_this_file_for_what_it_allocated_while_tracing():
    was_tracing = tracemalloc.is_tracing()
    host_alloc.start()
    try:
        held = [bytearray(1 << 20) for _ in range(8)]  # 8 MB, allocated on this file's line
        line = host_alloc.report()
        sizes = host_alloc.traced_by_file()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    assert sizes[__file__] >= 8 << 20 and len(held) == 8
    assert "Python allocations since placement" in line and "bench/test_host_alloc.py" in line
    allocating_line = test_report_names_this_file_for_what_it_allocated_while_tracing.__code__.co_firstlineno + 4
    assert f"largest lines: bench/test_host_alloc.py:{allocating_line} " in line


def test_pss_is_read_by_kind_from_smaps_rollup():
    rollup = ("55-7f ---p 00000000 00:00 0 [rollup]\nRss:  3000 kB\nPss:  2048 kB\nPss_Anon:  1024 kB\n"
              "Pss_File:  512 kB\nPss_Shmem:  512 kB\nLocked:  0 kB\nSwapPss:  0 kB\n")
    assert host_alloc.pss_parts(rollup) == {"Pss": 2 << 20, "Pss_Anon": 1 << 20, "Pss_File": 512 << 10,
                                            "Pss_Shmem": 512 << 10, "Locked": 0}
    if Path("/proc/self/smaps_rollup").is_file():
        assert host_alloc.pss_parts()["Pss"] > 0


def test_a_native_allocation_is_put_at_its_first_named_frame_past_the_allocator():
    frames = [("malloc", "libc.so.6", 0), ("operator new(unsigned long)", "new_op.cc", 0), ("??", "", 0),
              ("cuModuleLoadData", "", 0), ("at::native::foo()", "", 0)]
    assert host_alloc.native_site(frames) == ("cu", "cuModuleLoadData")
    cxx = "at::TensorBase at::detail::make_tensor_base<c10::TensorImpl>(x)"  # the return type comes first
    assert host_alloc.native_site([(cxx, "", 0)])[0] == "at"
    assert host_alloc.native_site([("_PyCode_NewEmpty", "codeobject.c", 3)]) == ("python", "_PyCode_NewEmpty")
    assert host_alloc.native_site([("ncclCommInitRank", "", 0)])[0] == "nccl"
    assert host_alloc.native_site([("malloc", "libc.so.6", 0)]) == ("?", "?")


def test_a_stack_of_unnamed_frames_is_put_at_its_library_and_an_mmap_says_so():
    stripped = [("mmap", "libc.so.6", 0), ("<unknown>", "/usr/lib/x86_64-linux-gnu/libcuda.so.1", 0),
                ("<unknown>", "/usr/lib/libnvidia-ptxjitcompiler.so.1", 0)]
    assert host_alloc.native_site(stripped, mmap=True) == ("libcuda.so.1", "unnamed frame in libcuda.so.1 [mmap]")
    named_deeper = stripped + [("cudaHostRegister", "libcudart.so.13", 0)]
    assert host_alloc.native_site(named_deeper) == ("cuda", "cudaHostRegister")
    assert host_alloc.native_site([("<unknown>", "<unknown>", 0)]) == ("?", "?")


def test_native_report_sums_by_family_largest_first():
    from collections import Counter

    sites = Counter({("cu", "cuModuleLoadData"): 300_000_000, ("nccl", "ncclCommInitRank"): 100_000_000,
                     ("cu", "cuLinkCreate"): 50_000_000})
    text = host_alloc.format_native(sites)
    assert text.startswith("native allocations still live 0.450 GB; by family: cu 350 MB, nccl 100 MB")
    assert "largest sites: cuModuleLoadData 300 MB" in text
    callers = {("cu", "cuModuleLoadData"): Counter({"runtime/triton_heuristics.py:1234 _precompile": 300_000_000})}
    text = host_alloc.format_native(sites, callers=callers)
    assert "cuModuleLoadData 300 MB (from runtime/triton_heuristics.py:1234 _precompile), nccl" in text


def test_a_live_native_mmap_is_recorded_with_its_python_caller(tmp_path):
    pytest.importorskip("memray")  # carried to the device as a wheel; not a dependency
    import mmap

    assert host_alloc.start_native(str(tmp_path / "native.bin"))
    held = mmap.mmap(-1, 64 << 20)
    held.write(b"x" * (64 << 20))
    text = host_alloc.stop_native()
    assert "[mmap]" in text and "test_host_alloc.py" in text and "test_a_live_native_mmap" in text, text
    held.close()


def test_stop_native_without_a_trace_says_so():
    assert host_alloc.stop_native() == "native trace not running"
