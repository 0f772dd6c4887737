"""The activation model against tensors autograd really keeps, measured on the CPU."""

from __future__ import annotations

import pytest
import torch

from streamtune.models import adapter_for
from streamtune.models.build import build_model, resolve_config
from streamtune.plan import memory
from streamtune.plan.sizing import size_model


def _measured_saved_bytes(name: str, tokens: int) -> int:
    """Bytes of distinct non-parameter storages autograd saves in one bf16 forward of the decoder."""
    model, _ = build_model(name, torch.bfloat16)
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        if tensor.data_ptr() not in param_ptrs:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(3, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model(inputs_embeds=embeds)
    return sum(storages.values())


@pytest.mark.parametrize("name", ["tiny-gemma4", "tiny-qwen3-moe", "tiny-llama"])
@pytest.mark.parametrize("tokens", [256, 1024])
def test_saved_activations_match_measured(name, tokens):
    config = resolve_config(name)
    sized = size_model(config, "bf16", 4, adapter_for(config).default_lora_targets, [])
    predicted = sum(memory.layer_saved_activation_bytes(layer, tokens) for layer in sized.layers)
    predicted += memory.attention_mask_bytes(sized, tokens)
    measured = _measured_saved_bytes(name, tokens)
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_checkpointing_keeps_less_than_full_activations():
    config = resolve_config("tiny-gemma4")
    sized = size_model(config, "bf16", 4, adapter_for(config).default_lora_targets, [])
    on = memory.activation_bytes(sized, 2048, 1024, checkpointing=True)
    off = memory.activation_bytes(sized, 2048, 1024, checkpointing=False)
    assert sum(on.values()) < sum(off.values())
    assert on["boundaries"] == sized.num_layers * 2048 * sized.hidden * 2
    assert on["loss"] == 1024 * sized.vocab * 4 * memory.LOGITS_COPIES
