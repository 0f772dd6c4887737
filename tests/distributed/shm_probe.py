"""A second local rank: maps layer 0 of a shared host store and reports what it sees.

``python shm_probe.py DIRECTORY OWNER_PID SIGNATURE NBYTES``: prints one JSON line with the sum of
the mapped bytes and how much the process's private (RssAnon) and shared (RssShmem) resident memory
grew while mapping and reading them, then writes 7 into byte 0 (the owner checks it sees it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from streamtune.distributed.shared_host import SharedHostStore


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    directory, owner_pid, signature, nbytes = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    store = SharedHostStore(Path(directory), owner=False, owner_pid=owner_pid, timeout_s=30)
    anon, shmem = _status_bytes("RssAnon"), _status_bytes("RssShmem")
    buffer, filled = store.buffer(0, signature, nbytes, pin=False)
    int(buffer.max())  # reads every page, allocates nothing of the buffer's size
    grew = {"anon": _status_bytes("RssAnon") - anon, "shmem": _status_bytes("RssShmem") - shmem}
    total = int(buffer.sum(dtype=torch.int64))
    buffer[0] = 7
    print(json.dumps({"filled": filled, "sum": total, **grew}))


if __name__ == "__main__":
    main()
