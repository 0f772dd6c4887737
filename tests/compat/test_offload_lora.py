"""P8/N1/N2: peft LoRA on accelerate-offloaded layers, and the fix."""

import pytest
import torch

from streamtune import compat
from streamtune.compat import offload_lora
from streamtune.compat.recipe import run_recipe

pytest.importorskip("accelerate")


def _tiny():
    return offload_lora.tiny_model(num_layers=4)


def test_lora_on_offloaded_layers_reproduces_then_fixed():
    outcome = offload_lora.reproduce_lora_on_offloaded()
    assert outcome.reproduces is True
    assert "on meta" in outcome.reason and "expected device meta" in outcome.reason
    compat.apply(["N1"])
    assert compat.applied() == ["lora-offloaded-materialise"]
    assert offload_lora.reproduce_lora_on_offloaded().reproduces is False
    compat.revert()
    assert offload_lora.reproduce_lora_on_offloaded().reproduces is True


def test_fix_offloaded_lora_helper_without_apply():
    from peft import get_peft_model

    model = offload_lora.offload_layers(_tiny())
    peft_model = get_peft_model(model, offload_lora.lora_config())
    changed = compat.fix_offloaded_lora(peft_model)
    assert changed and all(".layers.1." in n or ".layers.2." in n for n in changed)
    lora = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
    assert all(p.device.type == "cpu" for _, p in lora)
    lora_b = [p for n, p in lora if "lora_B" in n]
    assert all(torch.count_nonzero(p) == 0 for p in lora_b)  # re-initialised like peft does
    assert compat.fix_offloaded_lora(peft_model) == []  # nothing left to fix


def test_lora_before_dispatch_never_trains_until_helper():
    from peft import get_peft_model

    assert offload_lora.reproduce_lora_before_dispatch().reproduces is True
    peft_model = get_peft_model(_tiny(), offload_lora.lora_config())
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    offload_lora.offload_layers(peft_model)
    changed = compat.fix_offloaded_lora(peft_model)
    assert changed
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert all(p.device.type == "cpu" and bool((p == 0.01).all()) for p in lora_b)  # values kept
    ids = torch.randint(3, 1000, (2, 8))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


def test_stock_recipe_trains_with_apply_and_matches_resident():
    reference, grads = run_recipe(_tiny, "cpu", num_steps=3)
    assert reference.ok
    stock, _ = run_recipe(_tiny, "cpu", offloaded=(1, 2), num_steps=3, reference=grads)
    assert not stock.ok and "expected device meta" in stock.error
    compat.apply()
    fixed, _ = run_recipe(_tiny, "cpu", offloaded=(1, 2), num_steps=3, reference=grads)
    assert fixed.ok, fixed.error
    assert fixed.num_offloaded_layers == 2 and fixed.num_trainable == reference.num_trainable
    assert fixed.losses[-1] < fixed.losses[0]
    assert fixed.max_grad_rel_diff is not None and fixed.max_grad_rel_diff < 1e-4
    torch.testing.assert_close(torch.tensor(fixed.losses), torch.tensor(reference.losses), rtol=1e-4, atol=1e-5)
