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
