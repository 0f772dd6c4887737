import json
import time
from types import SimpleNamespace

import pytest

from streamtune.config import ModelConfig
from streamtune.data import build_tiny_tokenizer, load_tokenizer
from streamtune.data import tokenizer as tokenizer_module
from streamtune.errors import InputError
from streamtune.models import presets
from streamtune.models.presets import TINY_VOCAB_SIZE


def test_special_ids_match_tiny_presets(tok):
    assert len(tok) <= TINY_VOCAB_SIZE
    for name in ("tiny-gemma4", "tiny-llama", "tiny-qwen3-moe", "tiny-mixtral"):
        config = presets.preset_config(name)
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (
            config.pad_token_id, config.eos_token_id, config.bos_token_id)
    ids = tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    assert len(set(ids)) == 2 and max(ids) < len(tok)
    assert tok("<start_of_turn>", add_special_tokens=False)["input_ids"] == [ids[0]]


def test_round_trip(tok):
    for text in ["What is 23 + 45?", "Reverse: red fox\n  tabs\tand ünïcödé ✓ 東京", "SHIP RED, 11, 27"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < len(tok)
        assert tok.decode(ids) == text
    # The training corpus compresses well: BPE merges were learnt from it.
    sentence = "The capital of France is Paris."
    assert len(tok(sentence, add_special_tokens=False)["input_ids"]) < len(sentence) / 2


def test_deterministic_and_cached():
    first = build_tiny_tokenizer()
    tokenizer_module._tiny_tokenizer_json.cache_clear()
    start = time.perf_counter()
    second = build_tiny_tokenizer()
    build_s = time.perf_counter() - start
    assert first.get_vocab() == second.get_vocab()
    assert json.loads(first.backend_tokenizer.to_str())["model"]["merges"] == \
        json.loads(second.backend_tokenizer.to_str())["model"]["merges"]
    start = time.perf_counter()
    build_tiny_tokenizer()
    assert time.perf_counter() - start < 0.1
    assert build_s < 1.0


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<bos><start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello<end_of_turn>\n")
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert text.startswith(prompt)
    no_prompt = tok.apply_chat_template(messages[:2], tokenize=False)
    assert not no_prompt.endswith("model\n")
    ids = tok.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.decode(ids) == text


def test_load_tokenizer_tiny_preset():
    tok = load_tokenizer(ModelConfig(name="tiny-llama"))
    assert tok.eos_token_id == 1 and tok.chat_template


def test_load_tokenizer_from_directory(tmp_path):
    build_tiny_tokenizer().save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(ModelConfig(name="tiny-gemma4", tokenizer=str(tmp_path / "tok")))
    assert loaded("What is 2 + 3?")["input_ids"] == build_tiny_tokenizer()("What is 2 + 3?")["input_ids"]
    assert loaded.chat_template
    model_dir = tmp_path / "model"
    build_tiny_tokenizer().save_pretrained(model_dir)
    assert load_tokenizer(ModelConfig(name=str(model_dir))).eos_token_id == 1


def test_big_preset_needs_tokenizer():
    with pytest.raises(InputError, match="model.tokenizer") as info:
        load_tokenizer(ModelConfig(name="gemma4-26b-a4b"))
    assert "gemma4-26b-a4b" in str(info.value)


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(InputError, match=r"model\.tokenizer: .*does not exist; set model\.tokenizer"):
        load_tokenizer(ModelConfig(name="tiny-llama", tokenizer=str(tmp_path / "nope")))


def test_broken_tokenizer_directory(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(InputError, match=r"model\.tokenizer: could not load a tokenizer .*set model\.tokenizer"):
        load_tokenizer(SimpleNamespace(name="tiny-llama", tokenizer=str(tmp_path), trust_remote_code=False))


def test_model_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"model\.name: .*set model\.tokenizer"):
        load_tokenizer(ModelConfig(name=str(tmp_path)))
