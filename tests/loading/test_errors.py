"""Corrupt, truncated or mismatched checkpoints fail before any heavy work, naming tensor and shard."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamtune.errors import InputError
from streamtune.loading import load_checkpoint, open_checkpoint
from tests.loading.ckpts import save_preset, working_copy, weight_map

NAME = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return save_preset("tiny-llama", tmp_path_factory.mktemp("pristine") / "llama")


@pytest.fixture
def ckpt(tmp_path, pristine):
    return working_copy(pristine, tmp_path)


def _rewrite_shard_of(directory, name, edit):
    shard = directory / weight_map(directory)[name]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard


def test_truncated_shard_names_the_shard(ckpt):
    shard = ckpt / weight_map(ckpt)[NAME]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match=rf"shard .*{re.escape(shard.name)}: truncated .*re-download"):
        open_checkpoint(ckpt, torch.float32, progress=False)


def test_corrupt_header_names_the_shard(ckpt):
    shard = ckpt / weight_map(ckpt)[NAME]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"{re.escape(shard.name)}: corrupt safetensors header"):
        open_checkpoint(ckpt, torch.float32, progress=False)


def test_header_larger_than_file(ckpt):
    shard = ckpt / weight_map(ckpt)[NAME]
    shard.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(InputError, match=rf"{re.escape(shard.name)}: corrupt or truncated header"):
        open_checkpoint(ckpt, torch.float32, progress=False)


def test_missing_tensor_names_tensor_shard_and_shape(ckpt):
    shard = _rewrite_shard_of(ckpt, NAME, lambda t: t.pop(NAME))
    with pytest.raises(InputError) as info:
        open_checkpoint(ckpt, torch.float32, progress=False)
    message = str(info.value)
    assert f"tensor {NAME!r}" in message and "expected shape [64, 64]" in message
    assert f"missing from the checkpoint (index: {shard.name})" in message


def test_wrong_shape_names_tensor_shard_and_both_shapes(ckpt):
    name = "model.layers.0.mlp.up_proj.weight"
    shard = _rewrite_shard_of(ckpt, name, lambda t: t.__setitem__(name, torch.zeros(100, 64)))
    with pytest.raises(InputError) as info:
        open_checkpoint(ckpt, torch.float32, progress=False)
    message = str(info.value)
    assert f"tensor {name!r} in shard {shard.name} has shape [100, 64], expected [128, 64]" in message


def test_missing_expert_of_a_per_expert_checkpoint(tmp_path):
    directory = save_preset("tiny-qwen3-moe", tmp_path / "qwen")
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite_shard_of(directory, name, lambda t: t.pop(name))
    with pytest.raises(InputError, match=rf"tensor '{re.escape(name)}' \(for layers.2.mlp.experts.gate_up_proj, "
                                         r"expected shape \[32, 64\]\) is missing"):
        open_checkpoint(directory, torch.float32, progress=False)


def test_index_names_a_missing_shard(ckpt):
    shard = ckpt / weight_map(ckpt)[NAME]
    shard.unlink()
    with pytest.raises(InputError, match=rf"names shard\(s\) \['{re.escape(shard.name)}'\] that are not in"):
        open_checkpoint(ckpt, torch.float32, progress=False)


def test_no_weights_at_all(tmp_path, pristine):
    directory = tmp_path / "empty"
    directory.mkdir()
    shutil.copy(pristine / "config.json", directory)
    with pytest.raises(InputError, match="holds no \\*.safetensors weights"):
        load_checkpoint(directory, torch.float32, progress=False)


def test_unexpected_tensors_are_listed(ckpt):
    _rewrite_shard_of(ckpt, NAME, lambda t: t.__setitem__("model.extra_head.weight", torch.zeros(2)))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra_head.weight"] = index["weight_map"][NAME]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) not used by the llama model: model.extra_head.weight"):
        opened = open_checkpoint(ckpt, torch.float32, progress=False)
    assert opened.reader.unexpected == ["model.extra_head.weight"]
    opened.reader.close()


def test_shard_truncated_after_opening_is_caught_while_reading(ckpt):
    opened = open_checkpoint(ckpt, torch.float32, progress=False)
    shard = ckpt / weight_map(ckpt)[NAME]
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    with pytest.raises(InputError, match=rf"{re.escape(shard.name)}: truncated while reading tensor"):
        opened.reader.load_all(opened.model)
    opened.reader.close()


@pytest.mark.parametrize("codec", ["bf16", "int8", "nf4"])
def test_truncated_shard_through_the_engine_names_the_shard(ckpt, codec):
    from types import SimpleNamespace

    from streamtune.offload import place

    opened = open_checkpoint(ckpt, torch.float32, progress=False)
    opened.model.requires_grad_(False)
    shard = ckpt / weight_map(ckpt)[NAME]
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    memory = SimpleNamespace(stream="all", codec=codec, ring_slots=2, prefetch=1, gradient_checkpointing=False)
    with pytest.raises(InputError, match=rf"{re.escape(shard.name)}: truncated while reading tensor"):
        place(opened.model, opened.adapter, memory, "cpu", load_tensor=opened.load_tensor)
    opened.reader.close()
