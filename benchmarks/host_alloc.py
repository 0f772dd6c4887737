"""Which Python code holds a rank's host memory: allocations traced (``tracemalloc``) from placement on, summed
by source file and by package, printed with glibc's heap counters and the process's PSS by kind beside them.

Problem: a rank of the 26B preset grows by about 0.9 GB of private memory (0.8 GB of malloc heap) during its
first step, and ``/proc/self/smaps`` only says "[heap]". Solution: trace the Python allocations made after
placement; what they do not cover is native (CUDA driver, cuBLAS, NCCL, Triton's loader). Tracing slows the
first step's compiles, so it is opt-in (``multi_gpu.py --trace-alloc``).
"""

from __future__ import annotations

import tracemalloc
from collections import Counter
from pathlib import Path

# path fragments that name a package, most specific first
PACKAGES = ("torch/_inductor", "torch/_dynamo", "torch/_functorch", "torch/fx", "torch/utils/_sympy",
            "torch/_subclasses", "torch/distributed", "torch", "triton", "sympy", "transformers", "peft",
            "streamtune", "tokenizers", "safetensors")


def start() -> None:
    """Trace from now on, one frame per allocation (the allocating line is enough to name the package)."""
    if not tracemalloc.is_tracing():
        tracemalloc.start(1)


def package_of(filename: str) -> str:
    """The package a source file belongs to (``other`` when none of :data:`PACKAGES`)."""
    path = filename.replace("\\", "/")
    for package in PACKAGES:
        if f"/{package}/" in path or path.startswith(f"{package}/"):
            return package
    return "<frozen>" if path.startswith("<") else "other"


def by_package(sizes_by_file: dict[str, int]) -> list[tuple[str, int]]:
    """Bytes per package, largest first."""
    totals: Counter[str] = Counter()
    for filename, size in sizes_by_file.items():
        totals[package_of(filename)] += size
    return totals.most_common()


def traced_by_file() -> dict[str, int]:
    """Live traced bytes per source file now ({} when not tracing)."""
    if not tracemalloc.is_tracing():
        return {}
    stats = tracemalloc.take_snapshot().statistics("filename")
    return {stat.traceback[0].filename: stat.size for stat in stats}


def pss_parts(rollup: str | None = None) -> dict[str, int]:
    """This process's proportional set size by kind (``/proc/self/smaps_rollup``: ``Pss_Anon``, ``Pss_File``,
    ``Pss_Shmem``; ``Locked``: page-locked, as pinned memory is), in bytes; {} where the file is missing."""
    if rollup is None:
        path = Path("/proc/self/smaps_rollup")
        rollup = path.read_text() if path.is_file() else ""
    parts = {}
    for line in rollup.splitlines():
        key, _, value = line.partition(":")
        if key in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Locked") and value.strip().endswith("kB"):
            parts[key] = int(value.split()[0]) * 1024
    return parts


def report(max_items: int = 8) -> str:
    """One line: PSS by kind; glibc's heap counters; traced Python bytes in all, per package and the largest
    files."""
    from streamtune.hostmem import malloc_stats

    heap = malloc_stats()
    pss = pss_parts()
    parts = [", ".join(f"{key} {size / 1e9:.2f} GB" for key, size in pss.items())] if pss else []
    if heap is not None:
        parts.append(f"malloc heap {heap['heap_bytes'] / 1e9:.2f} GB ({heap['in_use_bytes'] / 1e9:.2f} in use, "
                     f"{heap['free_bytes'] / 1e9:.2f} free), mmapped {heap['mmapped_bytes'] / 1e9:.2f} GB")
    sizes = traced_by_file()
    if sizes:
        parts.append(f"Python allocations since placement {sum(sizes.values()) / 1e9:.3f} GB: "
                     + ", ".join(f"{name} {size / 1e6:.0f} MB" for name, size in by_package(sizes)[:max_items]))
        largest = sorted(sizes.items(), key=lambda item: -item[1])[:max_items]
        parts.append("largest files: " + ", ".join(f"{'/'.join(name.split('/')[-2:])} {size / 1e6:.0f} MB"
                                                   for name, size in largest))
    return "; ".join(parts) if parts else "no malloc counters and no trace"
