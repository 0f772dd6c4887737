"""Which Python code holds a rank's host memory: allocations traced (``tracemalloc``) from placement on, summed
by source file and by package, printed with glibc's heap counters and the process's PSS by kind beside them.

Problem: a rank of the 26B preset grows by about 0.9 GB of private memory (0.8 GB of malloc heap) during its
first step, and ``/proc/self/smaps`` only says "[heap]". Solution: trace the Python allocations made after
placement; what they do not cover is native (CUDA driver, cuBLAS, NCCL, Triton's loader). Tracing slows the
first step's compiles, so it is opt-in (``multi_gpu.py --trace-alloc``). The native part: ``--trace-native``
records every allocation with its C/C++ stack (memray) from placement to the end of the second step and sums what
is still allocated by family (library namespace or C prefix) and function (much slower; run it on a cut model).
"""

from __future__ import annotations

import re
import tracemalloc
from collections import Counter
from pathlib import Path

# path fragments that name a package, most specific first
PACKAGES = ("torch/_inductor", "torch/_dynamo", "torch/_functorch", "torch/fx", "torch/utils/_sympy",
            "torch/_subclasses", "torch/distributed", "torch", "triton", "sympy", "transformers", "peft",
            "streamtune", "tokenizers", "safetensors")


_NATIVE: dict[str, object] = {}
# frames that only pass an allocation on: the allocator and its C++ wrappers
_PASS_THROUGH = ("libc.so", "libc-", "libstdc++", "ld-linux", "memray", "malloc", "operator new")


def start_native(path: str) -> bool:
    """Record every native allocation from now on with its C/C++ stack (``memray``, carried as a wheel; not a
    dependency) to ``path``; False when memray is missing. :func:`stop_native` ends it."""
    try:
        import memray
    except ImportError:
        return False
    tracker = memray.Tracker(path, native_traces=True, follow_fork=False)
    tracker.__enter__()
    _NATIVE.update(tracker=tracker, path=path)
    return True


def stop_native(max_items: int = 12) -> str:
    """Stop :func:`start_native` and say what it recorded that is still allocated: bytes by family and the
    largest sites, each at the first named frame that is not the allocator (:func:`native_site`)."""
    tracker = _NATIVE.pop("tracker", None)
    if tracker is None:
        return "native trace not running"
    tracker.__exit__(None, None, None)
    import memray

    sites: Counter[tuple[str, str]] = Counter()
    callers: dict[tuple[str, str], Counter[str]] = {}
    for record in memray.FileReader(_NATIVE.pop("path")).get_leaked_allocation_records(merge_threads=True):
        is_mmap = memray.AllocatorType(record.allocator) == memray.AllocatorType.MMAP
        site = native_site(record.native_stack_trace(), is_mmap)
        sites[site] += record.size
        callers.setdefault(site, Counter())[python_caller(record.hybrid_stack_trace())] += record.size
    return format_native(sites, max_items, callers)


def python_caller(frames: list[tuple[str, str, int]]) -> str:
    """``file:line function`` of the innermost Python frame of an allocation's stack (memray's hybrid stack mixes
    native and Python frames, innermost first): what a native allocation served."""
    for function, filename, line in frames:
        if not filename.endswith(".py"):
            continue
        return f"{'/'.join(Path(filename).parts[-2:])}:{line} {function}"
    return "no Python frame"


def trace_native_first_steps(path: str, label: str, num_steps: int = 2) -> None:
    """Make training record native allocations (:func:`start_native`) from the end of placement to the end of its
    ``num_steps``-th step, then print ``[label native] ...`` (:func:`stop_native`)."""
    from streamtune.train.recipe import Recipe

    place, step_end = Recipe._attach_and_place, Recipe.on_step_end

    def placed(self, *args, **kwargs):
        result = place(self, *args, **kwargs)
        if not start_native(path):
            print(f"[{label} native] memray is not installed: nothing recorded", flush=True)
        return result

    def ended(self, step, *args, **kwargs):
        step_end(self, step, *args, **kwargs)
        if step == self.start_step + num_steps:
            print(f"[{label} native] {stop_native()}", flush=True)

    Recipe._attach_and_place, Recipe.on_step_end = placed, ended


def native_site(frames: list[tuple[str, str, int]], mmap: bool = False) -> tuple[str, str]:
    """(family, function) of the first frame of a native stack that is neither the allocator nor unnamed: the
    family is the C++ namespace (``c10``, ``at``, ``torch``, ``triton``, ``llvm``), the C prefix (``cu``, ``nccl``,
    ``mkl``) or ``python`` for CPython's own files. A stack of unnamed frames only (a stripped library such as the
    CUDA driver) is put at the library of its first one. ``mmap``: the allocation was an mmap (said in the name)."""
    library = ""
    for function, filename, _ in frames:
        if any(k in filename or k in function for k in _PASS_THROUGH):
            continue
        if function in ("", "??", "<unknown>"):
            library = library or Path(filename).name
            continue
        return _family(function, filename), function[:80] + " [mmap]" * mmap
    if library and library != "<unknown>":
        return library, f"unnamed frame in {library}" + " [mmap]" * mmap
    return "?", "?" + " [mmap]" * mmap


def _family(function: str, filename: str) -> str:
    if filename.endswith((".c", ".h")) and ("Py" in function or "/" not in filename):
        return "python"
    name = function.split("(")[0].split(" ")[-1] if "::" in function else function
    if "::" in name:
        return name.split("::")[0].lstrip("~") or "?"
    match = re.match(r"_*[a-z]+", name)
    return match.group(0).lstrip("_") if match else name[:12]


def format_native(sites: Counter, max_items: int = 12, callers: dict | None = None) -> str:
    """Bytes still allocated: in all, by family, and at the largest sites (with the Python line most of a site's
    bytes came from, when ``callers`` has it)."""
    families: Counter[str] = Counter()
    for (family, _), size in sites.items():
        families[family] += size
    return (f"native allocations still live {sum(sites.values()) / 1e9:.3f} GB; by family: "
            + ", ".join(f"{name} {size / 1e6:.0f} MB" for name, size in families.most_common(max_items))
            + "; largest sites: "
            + ", ".join(_site_text(site, size, callers) for site, size in sites.most_common(max_items)))


def _site_text(site: tuple[str, str], size: int, callers: dict | None) -> str:
    top = (callers or {}).get(site)
    return f"{site[1]} {size / 1e6:.0f} MB" + (f" (from {top.most_common(1)[0][0]})" if top else "")


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


def traced_by_line() -> list[tuple[str, int]]:
    """Live traced bytes per allocating line now, largest first, as ``dir/file.py:line`` (the file's bytes can
    come from one cache or one loop: session 12 put 141 MB in Inductor's ``codecache.py``)."""
    if not tracemalloc.is_tracing():
        return []
    stats = tracemalloc.take_snapshot().statistics("lineno")
    return [(f"{'/'.join(stat.traceback[0].filename.split('/')[-2:])}:{stat.traceback[0].lineno}", stat.size)
            for stat in stats]


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
        parts.append("largest lines: " + ", ".join(f"{where} {size / 1e6:.0f} MB"
                                                   for where, size in traced_by_line()[:max_items]))
    return "; ".join(parts) if parts else "no malloc counters and no trace"
