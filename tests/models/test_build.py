"""Random-weight presets: one fill per tensor name, whether built at once or filled lazily while packed."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from streamtune.models.build import LazyPreset, build_preset, fill_key

# allocator and encoder scratch: a constant (see tests/loading/test_rss.py)
STAGING_SLACK_BYTES = 64 << 20


def test_fill_key_ignores_wrappers():
    assert fill_key("model.layers.3.self_attn.q_proj.weight") == "layers.3.self_attn.q_proj.weight"
    assert fill_key("base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight") == \
        "layers.3.self_attn.q_proj.weight"
    assert fill_key("model.embed_tokens.weight") == "model.embed_tokens.weight"


@pytest.mark.parametrize("preset", ["tiny-gemma4", "tiny-llama"])
def test_lazy_preset_holds_the_eager_weights(preset):
    eager = build_preset(preset, torch.float32, seed=5)
    lazy = LazyPreset(preset, torch.float32, seed=5)
    assert lazy.model.model.layers[0].self_attn.q_proj.weight.untyped_storage().nbytes() < 64  # a placeholder
    lazy.load_all()
    eager_state, lazy_state = eager.state_dict(), lazy.model.state_dict()
    assert eager_state.keys() == lazy_state.keys()
    for name, value in eager_state.items():
        assert torch.equal(value, lazy_state[name]), name  # the same fill code on the same inputs


def test_different_tensors_and_seeds_differ():
    model = LazyPreset("tiny-llama", torch.float32, seed=0).load_all()
    q, k = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight
    assert not torch.allclose(q, k)
    other = LazyPreset("tiny-llama", torch.float32, seed=1).load_all()
    assert not torch.allclose(q, other.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_lazy_preset_packs_through_the_engine_like_the_eager_one(codec):
    from streamtune.offload import place

    memory = SimpleNamespace(stream="all", codec=codec, ring_slots=2, prefetch=1, gradient_checkpointing=False)
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for lazy in (False, True):
        source = LazyPreset("tiny-gemma4", torch.float32, seed=2)
        source.model.requires_grad_(False)
        if not lazy:
            source.load_all()
        placement = place(source.model, source.adapter, memory, "cpu", load_tensor=source.load_tensor)
        with torch.no_grad():
            logits.append(source.model(input_ids=ids).logits)
        placement.close()
    assert torch.equal(logits[0], logits[1])  # same weights, same packs, same kernels


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_lazy_preset_peak_rss_is_packed_size_plus_one_tensor(codec):
    done = subprocess.run([sys.executable, "-m", "tests.models.lazy_probe", codec],
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    from streamtune.quant.cpu_encode import num_workers

    bound = (facts["host_pack_bytes"] + facts["other_bytes"] + facts["largest_tensor_bytes"]
             + STAGING_SLACK_BYTES + num_workers(1 << 20) * (8 << 20))
    peak = facts["peak_bytes"] - facts["baseline_bytes"]
    print(f"{codec}: peak {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, "
          f"bf16 model {facts['model_bf16_bytes'] / 2**20:.0f} MiB")
    assert peak <= bound, facts
    assert bound < facts["model_bf16_bytes"], facts  # so the whole bf16 model never existed
    assert facts["final_bytes"] - facts["baseline_bytes"] >= 0.9 * facts["host_pack_bytes"], facts
