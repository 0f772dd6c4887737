"""N5 (kbit upcast of fused experts) and P10 (mm_token_type_ids): both ways."""

import inspect

import peft

from streamtune import compat
from streamtune.compat import hf


def test_kbit_upcast_reproduces_fix_keeps_dtype_and_reverts():
    original = peft.prepare_model_for_kbit_training
    outcome = hf.reproduce_kbit_upcasts_experts()
    assert outcome.reproduces is True and "x2.0" in outcome.reason
    assert compat.apply(["N5"]) == ["kbit-keep-expert-dtype"]
    assert peft.prepare_model_for_kbit_training is not original
    fixed = hf.reproduce_kbit_upcasts_experts()
    assert fixed.reproduces is False and "bfloat16" in fixed.reason
    compat.revert()
    assert peft.prepare_model_for_kbit_training is original
    assert hf.reproduce_kbit_upcasts_experts().reproduces is True


def test_kbit_fix_still_upcasts_norms():
    import torch

    compat.apply(["N5"])
    from streamtune.compat.offload_lora import tiny_model

    model = tiny_model(num_layers=2).to(torch.bfloat16)
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    dtypes = {p.dim(): p.dtype for p in model.parameters()}
    assert dtypes[3] == torch.bfloat16 and dtypes[1] == torch.float32


def test_mm_token_type_ids_both_ways(monkeypatch):
    assert hf.reproduce_mm_token_type_ids().reproduces is False
    old_source = 'if mm_token_type_ids is None:\n    raise ValueError("`mm_token_type_ids` is required")\n'
    monkeypatch.setattr(inspect, "getsource", lambda obj: old_source)
    assert hf.reproduce_mm_token_type_ids().reproduces is True
