"""The fast path on CUDA: FlexAttention backward, compiled fused loss and the recipe with train.kernels=auto."""

from __future__ import annotations

import json

import pytest
import torch

from streamtune.config import from_dict
from streamtune.kernels import apply_kernels, calls, reset, select_for_device
from streamtune.train import train
from streamtune.train.loss import count_valid_tokens, lm_loss_sum
from tests.kernels.steps import lora_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _loss_and_grads(model, adapter, batch, kernels):
    model.zero_grad(set_to_none=True)
    loss = lm_loss_sum(model, adapter, batch, 64, kernels) / count_valid_tokens(batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("compiled", [False, True], ids=["pieces", "compiled-layers"])
@pytest.mark.parametrize("name", ["tiny-gemma4", "tiny-llama"])
def test_fp32_fast_path_matches_eager_on_cuda(name, compiled):
    model, adapter = lora_model(name, "cuda")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 256), generator=gen)
    positions = torch.cat([torch.arange(100), torch.arange(156)]).repeat(2, 1)
    batch = {k: v.cuda() for k, v in {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}.items()}
    ref_loss, ref_grads = _loss_and_grads(model, adapter, batch, None)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        choice = select_for_device("auto", torch.device("cuda"), torch.float32, compile_layers=compiled)
        assert choice.flex_attention and choice.fused_linear_ce and choice.compile_loss
        apply_kernels(model, choice)
        reset()
        loss, grads = _loss_and_grads(model, adapter, batch, choice)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    assert calls("flex_attention") >= model.config.num_hidden_layers and calls("fused_linear_ce") == 1
    assert calls("flex_dense_fallback") == 0  # 256 tokens: the compiled FlexAttention kernel ran
    assert (calls("compiled_layer") >= model.config.num_hidden_layers) if compiled else calls("compiled_layer") == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    for key, ref in ref_grads.items():
        cosine = torch.nn.functional.cosine_similarity(grads[key].flatten(), ref.flatten(), dim=0)
        assert cosine > 0.999, key


def _fallback_state():
    """Which compiled pieces gave up (and why), and the kernel counters: the message of a failed assertion."""
    from streamtune.kernels import attention, experts, fused
    from streamtune.kernels.counters import CALLS

    return {"attention_broken": attention.FALLBACK.broken, "fused_broken": fused.FALLBACK.broken,
            "combine_failure": experts.COMBINE_FALLBACK.failure, "calls": dict(CALLS)}


@pytest.mark.parametrize("stream", ["none", "all"])
def test_recipe_auto_kernels_train_and_record_the_choice(tmp_path, run_dict, stream):
    raw = run_dict(tmp_path / "run", train={"device": "cuda", "max_steps": 8, "lr": 1e-2, "kernels": "auto"},
                   memory={"stream": stream})
    reset()
    result = train(from_dict(raw))
    state = _fallback_state()  # a piece that failed to compile earlier in the process runs eagerly from then on
    kernels = json.loads((tmp_path / "run" / "placement.json").read_text())["kernels"]
    assert calls("flex_attention") > 0 and calls("fused_linear_ce") > 0, state
    assert calls("fused_compiled") > 0 and calls("rms_norm_scaled") > 0, state  # the final norm, outside the layers
    # on sm80+ the layers are compiled by default: the pieces inside them run in their graphs, uncounted
    assert calls("compiled_layer" if kernels["compile_layers"] else "lora_compute_dtype") > 0, state
    assert sum(result.losses[-2:]) < sum(result.losses[:2]), result.losses
    assert kernels["mode"] == "auto" and kernels["attention"] == "streamtune_flex" and kernels["lora_layers"] > 0, kernels
    raw = run_dict(tmp_path / "eager", train={"device": "cuda", "max_steps": 1, "kernels": "eager"},
                   memory={"stream": stream})
    eager = train(from_dict(raw))
    assert abs(eager.losses[0] - result.losses[0]) / eager.losses[0] < 1e-2, (eager.losses[0], result.losses[0])


@pytest.mark.parametrize("stream", ["none", "all"])
def test_recipe_regional_layer_compile_composes_with_checkpointing_and_streaming(tmp_path, run_dict, stream):
    from streamtune.kernels import fused, regional

    raw = run_dict(tmp_path / "run", train={"device": "cuda", "max_steps": 4, "kernels": "auto",
                                            "compile_layers": True}, memory={"stream": stream})
    reset()
    result = train(from_dict(raw))
    assert calls("compiled_layer") > 0 and not regional.FALLBACK.broken and not fused.FALLBACK.broken
    kernels = json.loads((tmp_path / "run" / "placement.json").read_text())["kernels"]
    assert kernels["compile_layers"] is True and kernels["compiled_layers"] > 0
    raw = run_dict(tmp_path / "eager", train={"device": "cuda", "max_steps": 1, "kernels": "eager"},
                   memory={"stream": stream})
    eager = train(from_dict(raw))
    assert abs(eager.losses[0] - result.losses[0]) / eager.losses[0] < 1e-2
