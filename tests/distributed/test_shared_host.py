"""One host copy: a second process maps the owner's packed layer (same bytes, same pages, no private
copy), waits for it to be published, fails fast when the owner died, and a full /dev/shm is a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamtune.distributed.shared_host import SharedHostStore, remove_stale, shm_root
from streamtune.errors import InputError, StreamtuneError

REPO = Path(__file__).resolve().parents[2]
NBYTES = 64 * 2**20


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")


@pytest.fixture
def shm_dir():
    """A directory in the real shared-memory filesystem (/dev/shm), removed afterwards."""
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="streamtune-test-", dir=shm_root()))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_second_process_maps_the_same_pages(shm_dir):
    tmp_path = shm_dir
    owner = SharedHostStore(tmp_path, owner=True, owner_pid=os.getpid(), timeout_s=30)
    buffer, filled = owner.buffer(0, "sig", NBYTES, pin=False)
    assert not filled
    probe = subprocess.Popen([sys.executable, str(Path(__file__).with_name("shm_probe.py")), str(tmp_path),
                              str(os.getpid()), "sig", str(NBYTES)], env=_env(), stdout=subprocess.PIPE, text=True)
    buffer.copy_(torch.arange(NBYTES, dtype=torch.int64).remainder(251).to(torch.uint8))  # the "packing"
    expected = int(buffer.sum(dtype=torch.int64))
    owner.publish(0, "sig")  # the probe has been waiting for this
    out, _ = probe.communicate(timeout=120)
    assert probe.returncode == 0
    seen = json.loads(out)
    assert seen["filled"] and seen["sum"] == expected > 0
    assert int(buffer[0]) == 7  # the probe's write landed in our pages: one copy, not two
    if str(shm_root()).startswith("/dev/shm"):
        assert seen["shmem"] >= NBYTES // 2  # it read the shared pages...
    assert seen["anon"] < NBYTES // 4  # ...without a private copy of them
    owner.unlink()
    assert not tmp_path.exists() and int(buffer[1]) == 1  # mapping outlives the files


def test_waiting_rank_fails_fast_when_the_owner_is_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = SharedHostStore(tmp_path, owner=False, owner_pid=dead.pid, timeout_s=30)
    with pytest.raises(StreamtuneError, match="died while packing layer 3"):
        store.buffer(3, "sig", 1024, pin=False)


def test_layout_mismatch_is_refused(tmp_path):
    owner = SharedHostStore(tmp_path, owner=True, owner_pid=os.getpid(), timeout_s=30)
    owner.buffer(0, "a", 4096, pin=False)
    owner.publish(0, "a")
    other = SharedHostStore(tmp_path, owner=False, owner_pid=os.getpid(), timeout_s=30)
    with pytest.raises(StreamtuneError, match="different layout"):
        other.buffer(0, "b", 4096, pin=False)


def test_no_room_is_a_clear_error(tmp_path, monkeypatch):
    def refuse(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", refuse)
    owner = SharedHostStore(tmp_path, owner=True, owner_pid=os.getpid(), timeout_s=30)
    with pytest.raises(InputError, match="STREAMTUNE_SHARED_HOST=0"):
        owner.buffer(0, "sig", 4096, pin=False)
    assert not list(tmp_path.glob("*.bin"))


def test_stale_directories_of_dead_owners_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / "streamtune-old", tmp_path / "streamtune-live"
    for directory, pid in ((stale, dead.pid), (live, os.getpid())):
        directory.mkdir()
        (directory / "owner.pid").write_text(str(pid))
    remove_stale(tmp_path)
    assert not stale.exists() and live.exists()


class _Agents:
    """A rank's view of ``all_gather_object``: the entries the other local rank 0s would send."""

    def __init__(self, local_rank: int, others: list, timeout_s: float = 5.0):
        self.local_world_size, self.is_local_main, self.timeout_s = 2, local_rank == 0, timeout_s
        self.others, self.sent = others, None

    def all_gather_object(self, entry, what):
        self.sent = entry
        return [entry, *self.others]


def test_each_torchrun_agent_on_a_host_owns_its_copy(monkeypatch, tmp_path):
    """Two agents on one host (GROUP_RANK 0 and 1) each share their own copy: a rank takes its agent's owner."""
    import socket

    from streamtune.distributed.shared_host import create_store

    monkeypatch.setenv("STREAMTUNE_SHM_DIR", str(tmp_path))
    host = socket.gethostname()
    other_agent = (host, "0", str(tmp_path / "agent0"), os.getpid())
    monkeypatch.setenv("GROUP_RANK", "1")
    owner = _Agents(0, [other_agent])
    store = create_store(owner)
    assert store.owner and owner.sent[:2] == (host, "1") and store.directory.parent == tmp_path
    follower = _Agents(1, [owner.sent, other_agent])  # agent 1's second rank finds agent 1's owner, not agent 0's
    assert create_store(follower).directory == store.directory
    monkeypatch.setenv("GROUP_RANK", "0")  # a launcher that gives both groups the same agent number
    with pytest.raises(StreamtuneError, match="expected one local rank 0, found 2"):
        create_store(_Agents(0, [other_agent]))
