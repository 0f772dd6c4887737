"""The shared-memory sum of gloo ranks on one host: two real processes, the same sums on both, the sets alternating."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from streamtune.distributed import local_sum
from streamtune.distributed.context import DistContext


def _rank(rank: int, init_file: str, shm_dir: str, device: str, results: dict) -> None:
    import torch.distributed as dist

    os.environ["STREAMTUNE_SHM_DIR"] = shm_dir
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2, local_rank=rank, local_world_size=2, backend="gloo", device=device)
    # chunks of 1,200 elements: 3,000 go through as 1,200 + 1,200 + 600
    summer = local_sum.LocalSum.create(ctx, torch.float32, chunk_bytes=4 * 1200, pin=device == "cuda")
    sums = []
    for call in range(5):  # more chunks than slot sets: each set is written again after both ranks read it
        generator = torch.Generator().manual_seed(call * 10 + rank)
        values = torch.randn(3, 1000, generator=generator).to(device)
        sums.append(summer.sum_(values).cpu())
    results[rank] = (torch.stack(sums), sorted(os.listdir(shm_dir)))
    dist.destroy_process_group()


def _run(tmp_path, device: str) -> dict:
    # CUDA page-locks shared mappings of tmpfs files (/dev/shm), not of files on an ordinary or overlay filesystem
    root = Path("/dev/shm") if device == "cuda" and Path("/dev/shm").is_dir() else tmp_path
    shm = Path(tempfile.mkdtemp(prefix="streamtune-test-", dir=root))
    try:
        results = mp.Manager().dict()
        mp.spawn(_rank, args=(str(tmp_path / "init"), str(shm), device, results), nprocs=2, join=True)
        return dict(results)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def _expected() -> torch.Tensor:
    return torch.stack([sum(torch.randn(3, 1000, generator=torch.Generator().manual_seed(call * 10 + rank))
                            for rank in range(2)) for call in range(5)])


def test_two_ranks_get_the_same_sums_and_the_shared_file_is_unlinked(tmp_path):
    results = _run(tmp_path, "cpu")
    (sums0, files0), (sums1, _) = results[0], results[1]
    assert torch.equal(sums0, sums1)  # bit for bit: both add the slots in rank order
    torch.testing.assert_close(sums0, _expected())
    assert files0 == []  # unlinked once both ranks had mapped it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_ranks_on_one_gpu_sum_through_pinned_shared_memory(tmp_path):
    results = _run(tmp_path, "cuda")
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][0], _expected())


def test_applies_to_gloo_jobs_of_one_host_and_by_default_to_gpu_tensors(monkeypatch):
    host = DistContext(rank=0, world_size=2, local_rank=0, local_world_size=2, backend="gloo")
    assert local_sum.applies(host, on_cuda=True) and not local_sum.applies(host, on_cuda=False)
    assert not local_sum.applies(DistContext(world_size=2, local_world_size=2, backend="nccl"), True)
    assert not local_sum.applies(DistContext(world_size=4, local_world_size=2, backend="gloo"), True)  # two hosts
    assert not local_sum.applies(DistContext(backend="gloo"), True)  # one process
    monkeypatch.setenv(local_sum.ENABLE_ENV, "1")
    assert local_sum.applies(host, on_cuda=False)
    monkeypatch.setenv(local_sum.ENABLE_ENV, "0")
    assert not local_sum.applies(host, on_cuda=True)
    monkeypatch.setenv(local_sum.ENABLE_ENV, "yes")
    with pytest.raises(local_sum.InputError, match="STREAMTUNE_LOCAL_SUM='yes': use auto"):
        local_sum.applies(host, on_cuda=True)
