"""Batched int8 / nf4 decode on CUDA: one launch per codec per bind, equal to the per-tensor Triton decode."""

from __future__ import annotations

import warnings

import pytest
import torch

from streamtune.kernels import calls, reset
from streamtune.offload import batch_decode
from streamtune.offload.host import bind, bind_views, pack_layer
from streamtune.quant import get_codec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_one_launch_decodes_every_tensor_of_a_layer_like_the_codec(codec):
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(2816, 704), torch.nn.Linear(704, 2816), torch.nn.Linear(2816, 37))
    layer = layer.to(torch.bfloat16).requires_grad_(False)
    pack = pack_layer(0, layer, lambda name, shape: get_codec(codec if len(shape) == 2 else "bf16"),
                      torch.device("cuda"), pin=True)
    slot = pack.buffer.to("cuda")
    workspace = torch.empty(pack.decoded_nbytes, dtype=torch.uint8, device="cuda")
    batch_decode.reset()
    reset()
    views = bind_views(pack, slot, workspace)
    assert [plan.kind for plan in views.batch] == [codec] and len(views.batch[0].positions) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bind(pack, slot, workspace, views)
    assert calls(f"batched_{codec}_decode") == 1 and batch_decode.disabled_reason(codec) is None
    for entry, parts, _ in views.entries:
        if entry.param.dim() == 2:
            expected = get_codec(codec).decode(parts, entry.shape, entry.dtype)
            if codec == "int8":
                assert torch.equal(entry.param.data, expected), entry.name
            else:  # exp2 of the absmax may round differently in the two kernels
                torch.testing.assert_close(entry.param.data, expected, rtol=2 * 2**-7, atol=0)
