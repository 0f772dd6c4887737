"""Named GPU profiles and the measured link profile cache."""

from __future__ import annotations

import pytest

from streamtune.errors import InputError
from streamtune.plan import (
    DEFAULT_GPU, GPU_PROFILES, link_profile_path, load_link_profile, make_plan, resolve_link_profile,
    save_link_profile,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "streamtune" / "link.json"


def test_named_profiles_are_realistic():
    assert {"rtx4090", "rtx3090", "a100-40g", "a100-80g", "h100", "h200"} <= set(GPU_PROFILES)
    r4090 = GPU_PROFILES["rtx4090"]
    assert r4090.gpu_memory_bytes == 24 * 2**30 and r4090.h2d_gbps == 25.0
    assert r4090.matmul_tflops < 165.2  # an achieved fraction of the dense peak
    assert GPU_PROFILES["h100"].h2d_gbps == 54.0


def test_measured_profile_round_trip_and_override(cache):
    assert load_link_profile() is None
    assert resolve_link_profile().gpu_name == DEFAULT_GPU
    path = save_link_profile(h2d_gbps=53.1, matmul_tflops=612.0, gpu_name="NVIDIA H200",
                             dequant_gbps={"int8": 900.0, "nf4": 700.0})
    assert path == cache == link_profile_path()
    loaded = load_link_profile()
    assert (loaded.h2d_gbps, loaded.matmul_tflops, loaded.dequant_gbps_for("nf4")) == (53.1, 612.0, 700.0)
    assert loaded.gpu_memory_bytes == GPU_PROFILES["h200"].gpu_memory_bytes
    assert resolve_link_profile().source == str(cache)
    assert resolve_link_profile("rtx4090").h2d_gbps == 25.0
    assert make_plan("tiny-llama").link.h2d_gbps == 53.1


def test_broken_profile_is_an_input_error(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text('{"h2d_gbps": 10}')
    with pytest.raises(InputError, match="bench --link"):
        load_link_profile()


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(InputError, match="rtx4090"):
        resolve_link_profile("tpu-v5")
