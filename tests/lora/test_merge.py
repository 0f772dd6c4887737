"""merge(): the merged HF checkpoint gives the adapter's logits."""

from __future__ import annotations

import pytest
import torch

from streamtune.config import LoraConfig
from streamtune.errors import InputError
from streamtune.lora import attach_lora, merge, save_adapter
from streamtune.models.build import build_model


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    from streamtune.data import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("merge")
    model, adapter = build_model("tiny-gemma4", torch.float32, seed=2)
    peft_model = attach_lora(model, adapter, LoraConfig(rank=2), seed=0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.uniform_(-0.05, 0.05)
    info = {"model_name": "tiny-gemma4", "preset": True, "seed": 2, "dtype": "float32", "base_dir": None}
    out = save_adapter(peft_model, root / "adapter", build_tiny_tokenizer(), info)
    return out, peft_model


def test_merged_checkpoint_matches_adapter_logits(adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, peft_model = adapter_dir
    out = merge(path, tmp_path / "merged")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(str(out)).pad_token_id == 0


def test_merge_refuses_non_empty_out_and_bad_adapter(adapter_dir, tmp_path):
    path, _ = adapter_dir
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(InputError, match="--out"):
        merge(path, tmp_path / "busy")
    with pytest.raises(InputError, match="adapter_config.json"):
        merge(tmp_path, tmp_path / "out")
