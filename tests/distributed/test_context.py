"""Process-level settings a torchrun rank makes before it computes."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from streamtune.distributed import context


@pytest.fixture
def clean_env(monkeypatch):
    # set, then deleted: the undo then removes whatever a test leaves there (delenv alone records nothing
    # for an unset variable)
    monkeypatch.setenv(context.COMPILE_THREADS_ENV, "0")
    monkeypatch.delenv(context.COMPILE_THREADS_ENV)
    config = sys.modules.get("torch._inductor.config")
    saved = config.compile_threads if config is not None else None
    yield monkeypatch
    if config is not None:
        config.compile_threads = saved


def test_local_ranks_share_the_compile_workers(clean_env):
    clean_env.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    import torch._inductor.config as config

    assert context.share_compile_workers(4) == 4
    assert os.environ[context.COMPILE_THREADS_ENV] == "4" and config.compile_threads == 4


def test_one_rank_and_a_users_setting_are_left_alone(clean_env):
    assert context.share_compile_workers(1) is None
    assert context.COMPILE_THREADS_ENV not in os.environ
    clean_env.setenv(context.COMPILE_THREADS_ENV, "3")
    assert context.share_compile_workers(2) is None and os.environ[context.COMPILE_THREADS_ENV] == "3"


def test_more_ranks_than_cores_still_get_one_worker(clean_env):
    clean_env.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert context.share_compile_workers(8) == 1


def test_a_rank_caps_malloc_arenas_before_it_joins_the_group(clean_env):
    calls = []
    clean_env.setattr(context, "limit_malloc_arenas", lambda: calls.append("arenas"))
    clean_env.setattr(context, "_init_group", lambda ctx, device: calls.append("group"))
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        clean_env.setenv(key, value)
    ctx, device = context.init_from_env("cpu")
    assert calls == ["arenas", "group"] and ctx.rank == 1 and device.type == "cpu"


def _torchrun_env(monkeypatch) -> None:
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)


def test_dist_backend_auto_is_gloo_on_the_cpu_and_gloo_or_nccl_when_asked(clean_env):
    _torchrun_env(clean_env)
    clean_env.setattr(context, "limit_malloc_arenas", lambda: None)
    joined = []
    clean_env.setattr(context, "_init_group", lambda ctx, device: joined.append(ctx.backend))
    assert context.init_from_env("cpu")[0].backend == "gloo"
    assert context.init_from_env("cpu", "gloo")[0].backend == "gloo"
    with pytest.raises(context.InputError, match="train.dist_backend: nccl needs CUDA"):
        context.init_from_env("cpu", "nccl")
    assert joined == ["gloo", "gloo"]  # refused before joining any group


def _device_tensor(values):
    """``values`` as if it lived on a GPU: ``_reduced_on_host`` sees cuda:0, the copies stay on the CPU."""
    class DeviceTensor(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    return values.as_subclass(DeviceTensor)


def test_gloo_reduces_a_device_tensor_through_a_reused_host_buffer():
    """on_host: the collective runs on a host buffer that is written back, and the buffer is reused for the next
    tensor of that shape; a CPU tensor (or NCCL) is used as is."""
    staging = context.HostStaging(pin=False)
    values = _device_tensor(torch.tensor([1.0, 2.0]))
    with context.on_host(values, "gloo", staging) as staged:
        assert type(staged) is torch.Tensor and staged.data_ptr() != values.data_ptr()
        staged.mul_(3)  # what all_reduce would do in place
        assert values.tolist() == [1.0, 2.0]
        first = staged.data_ptr()
    assert values.tolist() == [3.0, 6.0]
    with context.on_host(_device_tensor(torch.tensor([5.0, 7.0])), "gloo", staging) as staged:
        assert staged.data_ptr() == first and staged.tolist() == [5.0, 7.0]  # the same buffer, this tensor's values
        with context.on_host(_device_tensor(torch.tensor([1.0, 1.0])), "gloo", staging) as inner:
            assert inner.data_ptr() != first  # a buffer in use is not handed out twice
    with context.on_host(_device_tensor(torch.tensor([1.0])), "gloo", staging) as staged:
        assert staged.shape == (1,)  # another shape: its own buffer
    cpu = torch.tensor([1.0])
    with context.on_host(cpu, "gloo", staging) as staged:
        assert staged is cpu
    with context.on_host(values, "nccl", staging) as staged:
        assert staged is values


def test_a_started_gloo_sum_is_written_back_when_waited_for():
    class Work:
        def __init__(self, host):
            self.host, self.waited = host, False

        def wait(self):
            self.host.add_(10)  # the background sum lands
            self.waited = True

    staging = context.HostStaging(pin=False)
    values = _device_tensor(torch.tensor([0.0]))
    host = staging.stage(values)
    work = Work(host)
    staged = context.HostStagedWork(work, host, values, staging)
    assert values.tolist() == [0.0]
    staged.wait()
    assert work.waited and values.tolist() == [10.0]
    assert staging.stage(values).data_ptr() == host.data_ptr()  # returned for reuse


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_staging_of_a_gpu_tensor_reads_what_queued_kernels_wrote_and_writes_back():
    staging = context.HostStaging()
    values = torch.zeros(1 << 22, device="cuda")
    for round_ in range(3):
        big = torch.randn(4096, 4096, device="cuda")
        values.copy_((big @ big).sum() * 0 + round_ + 1)  # queued behind a matmul: the D2H must wait for it
        host = staging.stage(values)
        assert host.is_pinned() and not host.is_cuda
        assert torch.equal(host, torch.full_like(host, round_ + 1.0))
        host.mul_(2)  # what a sum of two equal ranks does
        staging.unstage(host, values)
        assert torch.equal(values.cpu(), torch.full((1 << 22,), 2.0 * (round_ + 1)))
    assert len(staging._free[((1 << 22,), torch.float32)]) == 1  # one buffer, reused
