"""Process-level settings a torchrun rank makes before it computes."""

from __future__ import annotations

import os
import sys

import pytest

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


def test_gloo_reduces_a_device_tensor_through_a_host_copy():
    """on_host: the collective runs on a CPU copy that is written back; a CPU tensor (or NCCL) is used as is."""
    import torch

    class DeviceTensor:  # stands in for a CUDA tensor: what on_host touches
        device = torch.device("cuda", 0)

        def __init__(self):
            self.data = torch.tensor([1.0, 2.0])

        def cpu(self):
            return self.data.clone()

        def copy_(self, source):
            self.data.copy_(source)

    values = DeviceTensor()
    with context.on_host(values, "gloo") as staged:
        assert isinstance(staged, torch.Tensor) and staged is not values.data
        staged.mul_(3)  # what all_reduce would do in place
        assert values.data.tolist() == [1.0, 2.0]
    assert values.data.tolist() == [3.0, 6.0]
    cpu = torch.tensor([1.0])
    with context.on_host(cpu, "gloo") as staged:
        assert staged is cpu
    with context.on_host(values, "nccl") as staged:
        assert staged is values


def test_a_started_gloo_sum_is_written_back_when_waited_for():
    import torch

    class Work:
        def __init__(self, host):
            self.host, self.waited = host, False

        def wait(self):
            self.host.add_(10)  # the background sum lands
            self.waited = True

    host, values = torch.tensor([1.0]), torch.tensor([0.0])
    work = Work(host)
    staged = context.HostStagedWork(work, host, values)
    assert values.tolist() == [0.0]
    staged.wait()
    assert work.waited and values.tolist() == [11.0]
