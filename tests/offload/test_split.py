"""Layer split: range engines + device hooks give the numbers of one engine; one host copy of the weights."""

import copy

import pytest
import torch

from streamtune.config import MemoryConfig
from streamtune.models.adapters import decoder_layers
from streamtune.offload import StreamEngine
from streamtune.offload.split import DeviceMover, layer_ranges, move_closure, place_split
from tests.offload.lora_models import batches, lora_model
from tests.offload.test_engine import assert_same, train_steps


def _memory(**kw):
    return MemoryConfig(**{"ring_slots": 2, "prefetch": 1, **kw})


@pytest.mark.parametrize("name,boundary,streamed", [
    ("tiny-gemma4", 2, [[0], [3]]),
    ("tiny-gemma4", 1, [[], [1, 2, 3]]),
    ("tiny-llama", 2, [[1], []]),
])
def test_split_equals_single_engine(name, boundary, streamed):
    model, _ = lora_model(name)
    reference = copy.deepcopy(model)
    data = batches(4, seed=3)
    StreamEngine(reference, "cpu", streamed=[0, 2])
    expected = train_steps(reference, data, grad_accum=2)
    placement = place_split(model, _memory(), ["cpu", "cpu"], [boundary], streamed)
    moved = []
    original = DeviceMover.pre_hook

    def spy(self, index, args, kwargs):
        moved.append(index)
        return original(self, index, args, kwargs)

    DeviceMover.pre_hook = spy
    try:
        got = train_steps(model, data, grad_accum=2)
    finally:
        DeviceMover.pre_hook = original
    assert_same(expected, got)
    num_layers = len(decoder_layers(model))
    # every layer of the second range went through the device hook, once per forward
    assert sorted(set(moved)) == list(range(boundary, num_layers))
    assert len(moved) == len(data) * (num_layers - boundary)
    describe = placement.describe()
    assert describe["streamed_layers"] == [i for s in streamed for i in s]
    assert [r["layers"] for r in describe["layer_split"]] == [[0, boundary], [boundary, num_layers]]


def test_each_engine_packs_only_its_range():
    model, _ = lora_model("tiny-gemma4")
    single, _ = lora_model("tiny-gemma4")
    one = StreamEngine(single, "cpu", streamed=[0, 1, 2, 3])
    placement = place_split(model, _memory(), ["cpu", "cpu"], [3], [[0], [3]])
    assert sorted(placement.engines[0].packs) == [0, 1, 2]
    assert sorted(placement.engines[1].packs) == [3]
    assert placement.describe()["host_bytes"] == one.host_bytes
    # the run summary's ring line reads these (it printed "ring None slots" for a split)
    assert {k: placement.describe()[k] for k in ("ring_slots", "prefetch")} == {
        k: one.describe()[k] for k in ("ring_slots", "prefetch")}
    assert set(placement.tensor_codecs()) == set(one.tensor_codecs())
    placement.close()
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in decoder_layers(model))


def test_engine_refuses_indices_outside_its_range():
    model, _ = lora_model("tiny-llama")
    with pytest.raises(ValueError, match="out of range 1..2"):
        StreamEngine(model, "cpu", streamed=[0], layer_range=(1, 3))
    with pytest.raises(ValueError, match="layer_range"):
        StreamEngine(model, "cpu", streamed=[], layer_range=(3, 3))


def test_layer_ranges():
    assert layer_ranges(6, [2, 5]) == [(0, 2), (2, 5), (5, 6)]
    with pytest.raises(ValueError, match="increase strictly"):
        layer_ranges(6, [4, 4])
    with pytest.raises(ValueError):
        layer_ranges(6, [6])


class _Mask:
    """Stands for a FlexAttention BlockMask: moves itself with ``to``."""

    def __init__(self):
        self.calls = 0

    def to(self, device):
        self.calls += 1
        return self


def test_mover_moves_masks_once_per_pass_and_grads_always():
    mover = DeviceMover(torch.device("cpu"), first_index=4)
    mask = _Mask()
    hidden = torch.ones(2, requires_grad=True)
    for index in (4, 5, 6):
        args, kwargs = mover.pre_hook(index, (hidden,), {"attention_mask": mask, "position_ids": torch.arange(3)})
        assert args[0] is hidden and kwargs["attention_mask"] is mask
    assert mask.calls == 1
    mover.pre_hook(4, (hidden,), {"attention_mask": mask})
    assert mask.calls == 2


def _and(*fns):
    def both(b, h, q, k):
        return all(fn(b, h, q, k) for fn in fns)
    return both


def test_moved_block_mask_moves_the_tensors_its_mask_function_captured():
    from torch.nn.attention.flex_attention import create_block_mask

    docs = torch.tensor([0] * 70 + [1] * 58)

    def document(ids):
        def same_doc(b, h, q, k):
            return ids[q] == ids[k]
        return same_doc

    def causal(b, h, q, k):
        return q >= k

    mask_mod = _and(document(docs), causal)
    moved_fn = move_closure(mask_mod, torch.device("meta"))
    inner = moved_fn.__closure__[0].cell_contents[0]
    assert inner.__closure__[0].cell_contents.device.type == "meta"
    assert docs.device.type == "cpu" and mask_mod.__closure__[0].cell_contents[0] is not inner
    block = create_block_mask(lambda b, h, q, k: (docs[q] == docs[k]) & (q >= k), None, None, 128, 128, device="cpu",
                              BLOCK_SIZE=64)
    mover = DeviceMover(torch.device("meta"), first_index=0)
    moved = mover.move(block)
    captured = [c.cell_contents for c in moved.mask_mod.__closure__ if isinstance(c.cell_contents, torch.Tensor)]
    assert captured and all(t.device.type == "meta" for t in captured)
    assert moved.kv_num_blocks.device.type == "meta" and block.kv_num_blocks.device.type == "cpu"
    # once per pass: the same object again comes from the cache
    assert mover.move(block) is moved
