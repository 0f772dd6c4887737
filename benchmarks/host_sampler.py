"""Host memory of a launched job over its phases, sampled from outside it (benchmarks/multi_gpu.py): bytes in use
on the host (MemTotal - MemAvailable) and the proportional set size of the job's ranks and of its other processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def used_bytes() -> int:
    """Host memory in use: MemTotal - MemAvailable, in bytes."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":")
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


# PSS walks every page table entry of every process of the job (/proc/PID/smaps), holding each one's memory map
# lock meanwhile: 31 ms per 6 GiB of touched memory here, so about 0.13 s per 26B rank; every 0.5 s that kept a
# core busy beside the steps it measured. It is sampled every 5 s; MemAvailable (cheap) every 0.5 s.
PSS_EVERY_SAMPLES = 10
# Phases of a run: 0 loading, 1 its first step (compiles), 2 its second and third steps (the trainer stops the
# compile workers after step 2, while step 3 is not logged yet), 3 from step 4 on: what a long run keeps (the
# host-RAM target of the second rank is read here).
STEADY_PHASE = 3


def run_phase(num_logged_steps: int, finished: bool) -> int:
    """The phase of a run from the metric lines rank 0 has written (-1: none yet) and whether it finished."""
    if num_logged_steps < 0 or finished:
        return 0
    if num_logged_steps == 0:
        return 1
    return 2 if num_logged_steps < 3 else STEADY_PHASE


def _max_or_none(values: list[int | None]) -> int | None:
    return max([v for v in values if v is not None], default=None)


class HostSampler:
    """Host memory of a job over its phases: bytes in use every sample, PSS (slow: it walks every page table)
    every ``PSS_EVERY_SAMPLES`` samples and on entering a phase.

    Problem: a PSS measured in one phase and carried into the next (session 13: the steady maximum took a sample
    from before the compile workers stopped). Solution: a sample keeps a PSS only when it was measured in that
    sample's phase; the others carry None.
    """

    def __init__(self, measure_pss: Any) -> None:
        self.measure_pss = measure_pss
        self.samples: list[tuple[int, int, int | None, int | None]] = []
        self._pss: tuple[int, int] = (0, 0)
        self._pss_phase = -1

    def sample(self, phase: int, used_bytes: int) -> None:
        if phase != self._pss_phase or len(self.samples) % PSS_EVERY_SAMPLES == 0:
            self._pss, self._pss_phase = self.measure_pss(), phase
        fresh = self._pss_phase == phase
        self.samples.append((phase, used_bytes, *(self._pss if fresh else (None, None))))

    def summary(self) -> dict[str, int | None]:
        """Maxima over the training phases (1-3) and over the steady phase, of bytes in use and of PSS."""
        train = [s for s in self.samples if s[0]]
        steady = [s for s in self.samples if s[0] == STEADY_PHASE]
        return {"host_train_bytes": _max_or_none([b for _, b, _, _ in train]),
                "host_peak_bytes": _max_or_none([b for _, b, _, _ in self.samples]),
                "host_train_pss_bytes": _max_or_none([r + o for _, _, r, o in train if r is not None]),
                "host_steady_bytes": _max_or_none([b for _, b, _, _ in steady]),
                "host_steady_rank_pss_bytes": _max_or_none([r for _, _, r, _ in steady]),
                "host_steady_other_pss_bytes": _max_or_none([o for _, _, _, o in steady])}


def job_pss_bytes(pid: int) -> tuple[int, int]:
    """Proportional set size of a process tree (shared pages count once over the processes that map them):
    ``(ranks, others)``, the trainer ranks and the rest (the launcher, Inductor's compile workers)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    ranks = others = 0
    for proc in procs:
        try:
            pss = proc.memory_full_info().pss
            # torchrun sets LOCAL_RANK for the ranks, and their children (compile workers) inherit it: a rank is
            # a process with it whose parent (the launcher) has none. Until session 12 the workers counted as ranks.
            parent = proc.parent()
            if "LOCAL_RANK" in proc.environ() and (parent is None or "LOCAL_RANK" not in parent.environ()):
                ranks += pss
            else:
                others += pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return ranks, others
