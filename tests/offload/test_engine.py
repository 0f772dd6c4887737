"""Invariant 1: streaming changes no number. Invariant 4: one host copy of the base weights."""

import copy

import pytest
import torch

from streamtune.config import MemoryConfig
from streamtune.models.adapters import decoder_layers
from streamtune.offload import StreamEngine, place
from tests.offload.lora_models import TINY, batches, lora_grads, lora_model


def train_steps(model, data, grad_accum: int, lr: float = 1e-2, device="cpu"):
    """A few AdamW steps; returns per-micro-batch losses and the grads of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses, grads = [], []
    for start in range(0, len(data), grad_accum):
        for batch in data[start:start + grad_accum]:
            out = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            (out.loss / grad_accum).backward()
            losses.append(out.loss.item())
        grads.append(lora_grads(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def assert_same(ref, got, atol=2e-5):
    ref_losses, ref_grads = ref
    losses, grads = got
    assert losses == pytest.approx(ref_losses, abs=atol)
    assert len(grads) == len(ref_grads)
    for ref_step, step in zip(ref_grads, grads):
        assert ref_step.keys() == step.keys()
        for name in ref_step:
            torch.testing.assert_close(step[name], ref_step[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", TINY)
def test_streamed_equals_resident_all_architectures(name):
    model, _ = lora_model(name, experts=name != "tiny-llama")
    reference = copy.deepcopy(model)
    data = batches(4)
    StreamEngine(reference, "cpu", streamed=[], gradient_checkpointing=True)
    expected = train_steps(reference, data, grad_accum=2)
    num_layers = len(decoder_layers(model))
    engine = StreamEngine(model, "cpu", streamed=list(range(num_layers)), num_slots=2, prefetch=1)
    assert_same(expected, train_steps(model, data, grad_accum=2))
    assert engine.step_metrics()["h2d_bytes"] > 0


@pytest.mark.parametrize("num_slots,prefetch", [(1, 0), (1, 3), (2, 1), (3, 2), (4, 9)])
def test_ring_sizes_and_deep_prefetch(num_slots, prefetch):
    model, _ = lora_model("tiny-gemma4")
    reference = copy.deepcopy(model)
    data = batches(4, seed=1)
    StreamEngine(reference, "cpu", streamed=[])
    expected = train_steps(reference, data, grad_accum=2)
    StreamEngine(model, "cpu", streamed=[0, 1, 2, 3], num_slots=num_slots, prefetch=prefetch)
    assert_same(expected, train_steps(model, data, grad_accum=2))


def test_mixed_resident_and_streamed_with_dropout():
    # dropout draws random masks: the recompute must replay the forward's RNG exactly
    model, _ = lora_model("tiny-gemma4", dropout=0.2)
    reference = copy.deepcopy(model)
    data = batches(3, seed=2)
    StreamEngine(reference, "cpu", streamed=[])
    torch.manual_seed(123)
    expected = train_steps(reference, data, grad_accum=1)
    StreamEngine(model, "cpu", streamed=[1, 3], num_slots=2, prefetch=1)
    torch.manual_seed(123)
    assert_same(expected, train_steps(model, data, grad_accum=1))


@pytest.mark.parametrize("num_slots", [1, 2, 3, 4, 6])
def test_one_fetch_per_layer_per_pass_and_turnaround(num_slots):
    # forward fetches each layer once, the backward once more; the layers still in slots at a
    # turn (end of forward, end of backward) are reused without a copy.
    model, _ = lora_model("tiny-gemma4")
    engine = StreamEngine(model, "cpu", streamed=[0, 1, 2, 3], num_slots=num_slots, prefetch=1)
    num_layers, reused = 4, min(num_slots, 4)
    data = batches(3, seed=3)
    counts = []
    for batch in data:
        model(**batch, use_cache=False).loss.backward()
        counts.append(engine.step_metrics()["h2d_copies"])
    assert counts[0] == num_layers + (num_layers - reused)
    assert counts[1:] == [2 * (num_layers - reused)] * 2


def test_eval_forward_without_grad_and_close_restores_weights():
    model, _ = lora_model("tiny-llama")
    reference = copy.deepcopy(model).eval()
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
    engine = StreamEngine(model, "cpu", streamed=[0, 2], num_slots=1, prefetch=1)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, expected)
    # between layers, streamed weights are zero-byte placeholders: nothing holds a second copy
    for index in (0, 2):
        for entry in engine.packs[index].tensors:
            assert entry.param.data.untyped_storage().nbytes() <= entry.param.element_size()
    engine.close()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, expected)


def test_host_holds_one_copy_of_streamed_weights():
    model, _ = lora_model("tiny-qwen3-moe", experts=True)
    layers = decoder_layers(model)
    frozen_bytes = sum(p.numel() * p.element_size() for layer in layers
                       for p in layer.parameters() if not p.requires_grad)
    engine = StreamEngine(model, "cpu", streamed=list(range(len(layers))))
    assert frozen_bytes <= engine.host_bytes <= frozen_bytes + 256 * 64 * len(layers)
    for layer in layers:
        for p in layer.parameters():
            if not p.requires_grad:
                assert p.data.untyped_storage().nbytes() <= p.element_size()


def test_place_modes():
    for stream, expected in (("none", []), ("all", [0, 1, 2, 3]), ("auto", [])):
        model, adapter = lora_model("tiny-gemma4")
        placement = place(model, adapter, MemoryConfig(stream=stream), "cpu")
        assert placement.describe()["streamed_layers"] == expected


def test_out_of_range_layer_is_an_error():
    model, _ = lora_model("tiny-llama")
    with pytest.raises(ValueError, match="out of range"):
        StreamEngine(model, "cpu", streamed=[7])


def _codec_roundtrip_(model, codec_name: str, device: str = "cpu") -> None:
    """Replace every frozen layer weight by its codec round trip, decoded on ``device`` (as the engine does)."""
    from streamtune.offload.engine import codec_chooser

    choose = codec_chooser(codec_name)
    for layer in decoder_layers(model):
        for name, p in layer.named_parameters():
            if not p.requires_grad:
                codec = choose(name, tuple(p.shape))
                parts = {k: v.to(device) for k, v in codec.encode(p.data).items()}
                p.data = codec.decode(parts, tuple(p.shape), p.dtype).cpu()


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_streamed_codec_equals_resident_model_through_the_same_codec(codec):
    model, _ = lora_model("tiny-qwen3-moe", experts=True)
    reference = copy.deepcopy(model)
    _codec_roundtrip_(reference, codec)
    StreamEngine(reference, "cpu", streamed=[])
    data = batches(2, seed=4)
    expected = train_steps(reference, data, grad_accum=1)
    engine = StreamEngine(model, "cpu", streamed=[0, 2], codec=codec, num_slots=1)
    assert_same(expected, train_steps(model, data, grad_accum=1))
    # the compressed host copy is smaller than bf16/fp32 would be
    frozen = sum(p.numel() * p.element_size() for p in reference.parameters() if not p.requires_grad)
    assert engine.host_bytes < frozen / 2
    for p in model.parameters():
        assert p.grad is None or p.requires_grad


def test_set_streamed_replaces_without_changing_numbers():
    model, _ = lora_model("tiny-gemma4")
    reference = copy.deepcopy(model)
    data = batches(2, seed=5)
    StreamEngine(reference, "cpu", streamed=[])
    expected = train_steps(reference, data, grad_accum=1, lr=0.0)
    engine = StreamEngine(model, "cpu", streamed=[0, 1, 2, 3])
    engine.set_streamed([1])
    assert engine.describe()["resident_layers"] == [0, 2, 3]
    assert_same(expected, train_steps(model, data, grad_accum=1, lr=0.0))
    engine.set_streamed([])
    assert_same(expected, train_steps(model, data, grad_accum=1, lr=0.0))


def test_unpinned_host_buffer_has_the_exact_size():
    from streamtune.offload.host import alloc_host_buffer

    buffer = alloc_host_buffer(1000, pin=False)
    assert buffer.numel() == 1000 and buffer.dtype == torch.uint8


def test_bind_views_are_built_once_per_slot_and_dropped_with_the_ring(monkeypatch):
    import streamtune.offload.engine as engine_module

    built = []
    original = engine_module.bind_views
    monkeypatch.setattr(engine_module, "bind_views", lambda *a: built.append(a[0].index) or original(*a))
    model, _ = lora_model("tiny-qwen3-moe", experts=True)
    reference = copy.deepcopy(model)
    _codec_roundtrip_(reference, "int8")
    StreamEngine(reference, "cpu", streamed=[])
    data = batches(4, seed=6)
    expected = train_steps(reference, data, grad_accum=2)
    engine = StreamEngine(model, "cpu", streamed=[0, 1, 2], codec="int8", num_slots=2)
    assert_same(expected, train_steps(model, data, grad_accum=2))
    # 3 layers over 2 slots: each layer has met at most both slots, however many passes ran
    assert len(built) == len(engine._bind_views) <= 3 * 2
    engine.set_streamed([1])  # a new ring and workspace: no view of the old ones is kept
    assert engine._bind_views == {}
    train_steps(model, data[:1], grad_accum=1)
    assert list(engine._bind_views) == [(1, engine.ring.slots[0].buffer.data_ptr())]


def test_a_forward_bound_before_placement_survives_it():
    """``train.compile_layers`` binds each layer's forward before placement: resident, re-placed and closed
    layers keep it (it was deleted with the engine's wrapper, so resident layers silently ran eagerly)."""
    import types

    model, _ = lora_model("tiny-llama")
    layers = decoder_layers(model)
    calls = []

    def marked_forward(self, *args, **kwargs):
        calls.append(self)
        return type(self).forward(self, *args, **kwargs)

    for layer in layers:
        layer.forward = types.MethodType(marked_forward, layer)
    engine = StreamEngine(model, "cpu", streamed=[1])
    train_steps(model, batches(1, seed=6), grad_accum=1)
    assert len(calls) >= len(layers)  # every layer, streamed or resident, went through it
    engine.set_streamed([0])
    assert layers[1].__dict__["forward"].__func__ is marked_forward
    engine.close()
    assert all(layer.__dict__["forward"].__func__ is marked_forward for layer in layers)


def test_close_leaves_the_class_forward_of_layers_without_one_of_their_own():
    model, _ = lora_model("tiny-llama")
    engine = StreamEngine(model, "cpu", streamed=[0, 1])
    engine.close()
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))


def test_compiled_layers_with_dropout_recompute_the_forwards_masks():
    """``train.compile_layers`` (on by default on CUDA): Inductor draws its own dropout masks; the streamed and the
    HF checkpoints restore the RNG before they recompute, so the gradients are those of the forward that ran
    (reference: the same compiled layers without any checkpoint)."""
    from streamtune.kernels import calls, reset
    from streamtune.kernels.regional import compile_layers

    model, _ = lora_model("tiny-llama", dropout=0.3)
    reference = copy.deepcopy(model)
    for m in (model, reference):
        compile_layers(decoder_layers(m))
    data = batches(2, seed=2)
    StreamEngine(reference, "cpu", streamed=[], gradient_checkpointing=False)
    torch.manual_seed(123)
    expected = train_steps(reference, data, grad_accum=1)
    StreamEngine(model, "cpu", streamed=[0, 2], num_slots=2, prefetch=1)  # layer 1: resident, HF checkpoint
    reset()
    torch.manual_seed(123)
    assert_same(expected, train_steps(model, data, grad_accum=1), atol=1e-4)
    assert calls("compiled_layer") >= 3 * len(decoder_layers(model))  # each layer's forward and recompute
