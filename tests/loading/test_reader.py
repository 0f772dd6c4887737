"""Checkpoints saved with ``save_pretrained`` (several shards) load exactly, through the engine too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from streamtune.loading import load_checkpoint, open_checkpoint
from streamtune.models.adapters import decoder_layers
from streamtune.offload import place
from tests.loading.ckpts import save_gemma4_multimodal, save_preset, shard_paths

TINY = ["tiny-gemma4", "tiny-qwen3-moe", "tiny-llama", "tiny-mixtral"]
IDS = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    dirs = {name: save_preset(name, root / name) for name in TINY}
    dirs["gemma4-multimodal"] = save_gemma4_multimodal(root / "gemma4-mm")
    return dirs


def _stock(directory, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()


def _text_state(stock):
    """The stock model's text weights under the causal LM's names."""
    state = stock.state_dict()
    if any(k.startswith("model.language_model.") for k in state):
        return {k.replace("model.language_model.", "model."): v for k, v in state.items()
                if k.startswith("model.language_model.") or k.startswith("lm_head.")}
    return state


def _memory(stream, codec="bf16"):
    return SimpleNamespace(stream=stream, codec=codec, ring_slots=2, prefetch=1, gradient_checkpointing=False)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _assert_same_logits(model, stock):
    """Bit-exact where both run the same model class (same kernels, same weights); within float
    tolerance where they do not (``Gemma4ForCausalLM`` vs ``Gemma4ForConditionalGeneration``: the
    two forwards order their ops differently, which shows as ~1e-6 on some CPUs)."""
    got, expected = _logits(model), _logits(stock)
    if type(model) is type(stock):
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [*TINY, "gemma4-multimodal"])
def test_weights_and_logits_equal_stock_from_pretrained(saved, name):
    directory = saved[name]
    assert len(shard_paths(directory)) >= 3
    stock = _stock(directory)
    model, _ = load_checkpoint(directory, torch.float32, progress=False)
    got, expected = model.state_dict(), _text_state(stock)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    _assert_same_logits(model, stock)


@pytest.mark.parametrize("stream", ["all", "none"])
@pytest.mark.parametrize("name", ["tiny-gemma4", "tiny-qwen3-moe", "gemma4-multimodal"])
def test_engine_fills_layers_from_the_shards(saved, name, stream):
    stock = _stock(saved[name])
    opened = open_checkpoint(saved[name], torch.float32, progress=False)
    layer = decoder_layers(opened.model)[0]
    assert all(p.data.untyped_storage().nbytes() <= 4 for p in layer.parameters())
    opened.model.requires_grad_(False)  # the base is frozen, as under LoRA: the engine packs frozen weights
    placement = place(opened.model, opened.adapter, _memory(stream), "cpu", load_tensor=opened.load_tensor)
    assert placement.engine.host_bytes > 0
    stats = opened.finish()
    assert stats["bytes_read"] > 0
    _assert_same_logits(opened.model, stock)
    placement.close()


def test_bf16_checkpoint_exact_and_fp32_converted(tmp_path, saved):
    directory = save_preset("tiny-llama", tmp_path / "bf16", dtype=torch.bfloat16)
    stock = _stock(directory, torch.bfloat16).state_dict()
    model, _ = load_checkpoint(directory, torch.bfloat16, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stock.items())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    widened, _ = load_checkpoint(directory, torch.float32, progress=False)
    assert all(torch.equal(widened.state_dict()[k], v.float()) for k, v in stock.items())
    narrowed, _ = load_checkpoint(saved["tiny-llama"], torch.bfloat16, progress=False)
    fp32 = _stock(saved["tiny-llama"]).state_dict()
    assert all(torch.equal(narrowed.state_dict()[k], v.to(torch.bfloat16)) for k, v in fp32.items())


def _codec_round_trip(model, codec_name):
    from streamtune.offload.engine import codec_chooser
    from streamtune.offload.host import frozen_parameters

    choose = codec_chooser(codec_name)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for param in layer.parameters():
                param.requires_grad_(False)
            for name, param in frozen_parameters(layer):
                codec = choose(name, tuple(param.shape))
                param.data = codec.decode(codec.encode(param.data), tuple(param.shape), param.dtype)


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_codec_round_trip_through_the_engine(saved, codec):
    directory = saved["tiny-gemma4"]
    reference = _stock(directory)
    _codec_round_trip(reference, codec)
    opened = open_checkpoint(directory, torch.float32, progress=False)
    opened.model.requires_grad_(False)
    placement = place(opened.model, opened.adapter, _memory("all", codec), "cpu", load_tensor=opened.load_tensor)
    opened.finish()
    assert placement.engine.host_bytes < sum(p.numel() * 4 for layer in decoder_layers(reference)
                                             for p in layer.parameters())
    torch.testing.assert_close(_logits(opened.model), _logits(reference), rtol=1e-5, atol=1e-5)
    placement.close()


@pytest.mark.parametrize("name", ["tiny-gemma4", "tiny-qwen3-moe", "tiny-mixtral"])
def test_lora_attaches_to_placeholders_like_to_real_weights(saved, name):
    from streamtune.config import LoraConfig
    from streamtune.lora import attach_lora

    lora_cfg = LoraConfig(rank=4, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    stock = _stock(saved[name])
    from streamtune.models.adapters import adapter_for

    expected = attach_lora(stock, adapter_for(stock.config), lora_cfg, seed=3)
    opened = open_checkpoint(saved[name], torch.float32, progress=False)
    model = attach_lora(opened.model, opened.adapter, lora_cfg, seed=3)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("experts" in n for n in lora)
    for n, p in expected.named_parameters():
        if p.requires_grad:
            assert torch.equal(lora[n], p), n
    for p in lora.values():  # B is zero at init: make the adapters count in the comparison
        torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        for n, p in expected.named_parameters():
            if p.requires_grad:
                p.copy_(lora[n])
    placement = place(model, opened.adapter, _memory("all"), "cpu", load_tensor=opened.load_tensor)
    opened.finish()
    torch.testing.assert_close(_logits(model), _logits(expected), rtol=0, atol=0)
    placement.close()


def test_fused_expert_layout_loads_too(tmp_path, saved):
    """A checkpoint written with the in-memory (fused) names, by hand, loads like the per-expert one."""
    stock = _stock(saved["tiny-qwen3-moe"])
    directory = tmp_path / "fused"
    directory.mkdir()
    (directory / "config.json").write_text((saved["tiny-qwen3-moe"] / "config.json").read_text())
    state = {k: v.contiguous() for k, v in stock.state_dict().items()}
    keys = sorted(state)
    for part in range(3):
        save_file({k: state[k] for k in keys[part::3]}, str(directory / f"part-{part}.safetensors"))
    model, _ = load_checkpoint(directory, torch.float32, progress=False)
    _assert_same_logits(model, stock)


def test_tied_embeddings_share_one_tensor(saved):
    model, _ = load_checkpoint(saved["tiny-gemma4"], torch.float32, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied, _ = load_checkpoint(saved["tiny-llama"], torch.float32, progress=False)
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_multimodal_towers_are_skipped_not_unexpected(saved, recwarn):
    opened = open_checkpoint(saved["gemma4-multimodal"], torch.float32, progress=False)
    opened.reader.load_all(opened.model)
    opened.finish()
    assert opened.reader.unexpected == []
    assert any(n.startswith("model.vision_tower.") for n in opened.reader.skipped)
    assert not [w for w in recwarn if "not used" in str(w.message)]


def test_progress_bar_counts_gigabytes(saved, capsys):
    opened = open_checkpoint(saved["tiny-llama"], torch.float32, progress=True)
    opened.reader.load_all(opened.model)
    stats = opened.finish()
    err = capsys.readouterr().err
    assert "loading weights" in err and "B/s" in err
    files = sum(p.stat().st_size for p in shard_paths(saved["tiny-llama"]))
    assert 0.9 * files < stats["bytes_read"] <= files


def test_bf16_layers_are_read_straight_into_their_pack(saved):
    stock = _stock(saved["tiny-qwen3-moe"])
    opened = open_checkpoint(saved["tiny-qwen3-moe"], torch.float32, progress=False)
    opened.model.requires_grad_(False)
    destinations = []

    def load_tensor(index, name, param, out=None):
        destinations.append((index, out))
        opened.load_tensor(index, name, param, out)

    placement = place(opened.model, opened.adapter, _memory("all"), "cpu", load_tensor=load_tensor)
    opened.finish()
    assert destinations and all(out is not None for _, out in destinations)
    for index, out in destinations:
        buffer = placement.engine.packs[index].buffer
        start = buffer.data_ptr()
        assert start <= out.data_ptr() < start + buffer.numel()  # a view of the pack: no unpacked copy
    _assert_same_logits(opened.model, stock)
    placement.close()


def test_segments_are_handed_over_in_order_each_fully_read(saved, monkeypatch):
    from streamtune.loading import reader as reader_module

    monkeypatch.setattr(reader_module, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(reader_module, "SEGMENT_BYTES", 4096)
    opened = open_checkpoint(saved["tiny-qwen3-moe"], torch.float32, progress=False)
    layer = decoder_layers(opened.model)[0]
    name, param = next((n, p) for n, p in layer.named_parameters() if p.dim() == 3)  # per-expert pieces
    reference = _stock_param(saved["tiny-qwen3-moe"], name)
    ranges = []

    def consume(start, stop):
        flat = param.data.reshape(-1)
        assert torch.equal(flat[:stop], reference.reshape(-1)[:stop])  # everything before stop is read
        ranges.append((start, stop))

    opened.load_tensor(0, name, param, segment_numel=64, consume=consume)
    assert len(ranges) > 3 and ranges[0][0] == 0 and ranges[-1][1] == param.numel()
    assert all(a[1] == b[0] and a[0] % 64 == 0 for a, b in zip(ranges, ranges[1:]))
    opened.reader.close()


def _stock_param(directory, name):
    from streamtune.models.adapters import decoder_layers as layers_of

    return dict(layers_of(_stock(directory))[0].named_parameters())[name].detach()
