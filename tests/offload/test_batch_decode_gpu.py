"""Batched int8 decode on CUDA: one launch per bind, bit-equal to the per-tensor Triton decode."""

from __future__ import annotations

import warnings

import pytest
import torch

from streamtune.kernels import calls, reset
from streamtune.offload import batch_decode
from streamtune.offload.host import bind, bind_views, pack_layer
from streamtune.quant import get_codec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_one_launch_decodes_every_int8_tensor_of_a_layer_like_the_codec():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(2816, 704), torch.nn.Linear(704, 2816), torch.nn.Linear(2816, 37))
    layer = layer.to(torch.bfloat16).requires_grad_(False)
    params = [p for p in layer.parameters() if p.dim() == 2]
    pack = pack_layer(0, layer, lambda name, shape: get_codec("int8" if len(shape) == 2 else "bf16"),
                      torch.device("cuda"), pin=True)
    slot = pack.buffer.to("cuda")
    workspace = torch.empty(pack.decoded_nbytes, dtype=torch.uint8, device="cuda")
    batch_decode.reset()
    reset()
    views = bind_views(pack, slot, workspace)
    assert views.batch is not None and len(views.batch.positions) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bind(pack, slot, workspace, views)
    assert calls("batched_int8_decode") == 1 and batch_decode.disabled_reason() is None
    for entry, parts, out in views.entries:
        if any(entry.param is p for p in params):
            assert torch.equal(entry.param.data, get_codec("int8").decode(parts, entry.shape, entry.dtype))
