"""GPU checks of the engine (run on the device): equivalence on CUDA and invariant 2 (no early overwrite)."""

import copy

import pytest
import torch

from streamtune.models.adapters import decoder_layers
from streamtune.offload import StreamEngine
from tests.offload.lora_models import batches, lora_model
from tests.offload.test_engine import assert_same, train_steps

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", ["tiny-gemma4", "tiny-qwen3-moe", "tiny-llama"])
@pytest.mark.parametrize("num_slots,prefetch", [(1, 1), (2, 1), (3, 5)])
def test_streamed_equals_resident_on_cuda(name, num_slots, prefetch):
    torch.backends.cuda.matmul.allow_tf32 = False
    model, _ = lora_model(name, experts=name != "tiny-llama")
    reference = copy.deepcopy(model)
    data = batches(4)
    StreamEngine(reference, "cuda", streamed=[])
    expected = train_steps(reference, data, grad_accum=2, device="cuda")
    num_layers = len(decoder_layers(model))
    engine = StreamEngine(model, "cuda", streamed=list(range(num_layers)), num_slots=num_slots, prefetch=prefetch)
    assert_same(expected, train_steps(model, data, grad_accum=2, device="cuda"), atol=1e-4)
    metrics = engine.step_metrics()
    assert metrics["h2d_bytes"] > 0 and metrics["h2d_gbps"] > 0
    assert engine.packs[0].buffer.is_pinned()


def _delay_each_layer(model, cycles: int) -> list:
    # a long GPU sleep at the start of every layer: compute lags far behind the host, so a copy that
    # did not wait for the slot's free event would overwrite weights that queued kernels still read
    handles = []
    for layer in decoder_layers(model):
        first = next(iter(layer.children()))
        handles.append(first.register_forward_pre_hook(lambda *_: torch.cuda._sleep(cycles)))
    return handles


@pytest.mark.parametrize("skip_free_wait", [False, True])
def test_slot_is_not_overwritten_while_a_kernel_may_read_it(skip_free_wait):
    model, _ = lora_model("tiny-llama")
    reference = copy.deepcopy(model).eval()
    ids = batches(1)[0]["input_ids"].cuda()
    StreamEngine(reference, "cuda", streamed=[])
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
    engine = StreamEngine(model, "cuda", streamed=[0, 1, 2], num_slots=1, prefetch=1)
    engine.ring.skip_free_wait = skip_free_wait
    model.eval()
    _delay_each_layer(model, cycles=200_000_000)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    torch.cuda.synchronize()
    if skip_free_wait:
        # negative control: without the event the race is real and visible
        assert not torch.allclose(got, expected, atol=1e-3)
    else:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_compressed_resident_and_streamed_layers_on_cuda(codec):
    from tests.offload.test_engine import _codec_roundtrip_

    torch.backends.cuda.matmul.allow_tf32 = False
    model, _ = lora_model("tiny-gemma4", experts=True)
    reference = copy.deepcopy(model)
    _codec_roundtrip_(reference, codec, device="cuda")
    StreamEngine(reference, "cuda", streamed=[])
    data = batches(2, seed=6)
    expected = train_steps(reference, data, grad_accum=1, device="cuda")
    engine = StreamEngine(model, "cuda", streamed=[1, 3], codec=codec)
    assert engine.describe()["resident_layers"] == [0, 2]
    assert engine.compressed_resident == {0, 2}
    assert_same(expected, train_steps(model, data, grad_accum=1, device="cuda"), atol=1e-4)


def test_host_buffers_are_pinned_at_their_exact_size():
    from streamtune.offload.host import alloc_host_buffer

    nbytes = 3 * (1 << 20) + 256  # not a power of two: the caching host allocator would round it up
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    buffer = alloc_host_buffer(nbytes, pin=True)
    assert buffer.is_pinned() and buffer.numel() == nbytes
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == before
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    buffer.copy_(torch.arange(nbytes, dtype=torch.int64).remainder(251).to(torch.uint8))
    device.copy_(buffer, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(device.cpu(), buffer)
