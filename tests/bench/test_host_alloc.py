"""benchmarks/host_alloc.py: Python allocations traced after placement, summed by package."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

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


def test_pss_is_read_by_kind_from_smaps_rollup():
    rollup = ("55-7f ---p 00000000 00:00 0 [rollup]\nRss:  3000 kB\nPss:  2048 kB\nPss_Anon:  1024 kB\n"
              "Pss_File:  512 kB\nPss_Shmem:  512 kB\nLocked:  0 kB\nSwapPss:  0 kB\n")
    assert host_alloc.pss_parts(rollup) == {"Pss": 2 << 20, "Pss_Anon": 1 << 20, "Pss_File": 512 << 10,
                                            "Pss_Shmem": 512 << 10, "Locked": 0}
    if Path("/proc/self/smaps_rollup").is_file():
        assert host_alloc.pss_parts()["Pss"] > 0
