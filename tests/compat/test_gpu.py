"""Device parts of the doctor and the stock recipe on CUDA (run by the lead on the GPU machine)."""

import json

import pytest
import torch

from streamtune import compat
from streamtune.compat import offload_lora, system
from streamtune.compat.recipe import run_recipe

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICE = "cuda:0"


def test_doctor_reports_gpu_and_pinned_bandwidth(capsys):
    from streamtune.cli import main

    info = system.cuda_info()
    assert info["available"] and info["devices"][0]["memory_bytes"] > 0
    assert system.pinned_h2d_gbps() > 1.0
    assert main(["doctor", "--json", "--only", "P10"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cuda"]["available"] is True and report["pinned_h2d_gbps"] > 1.0


def test_offloaded_int8_backward_on_cuda_both_ways():
    pytest.importorskip("bitsandbytes")
    from streamtune.compat import bnb

    assert bnb.reproduce_offloaded_int8_backward(DEVICE).reproduces is True
    compat.apply(["P2"])
    try:
        assert bnb.reproduce_offloaded_int8_backward(DEVICE).reproduces is False
    finally:
        compat.revert()


def _tiny():
    return offload_lora.tiny_model(num_layers=4)


def test_stock_recipe_on_cuda_with_and_without_apply():
    compat.revert()
    reference, grads = run_recipe(_tiny, DEVICE, num_steps=4)
    assert reference.ok, reference.error
    stock, _ = run_recipe(_tiny, DEVICE, offloaded=(1, 2), num_steps=4, reference=grads)
    assert not stock.ok and "expected device meta" in stock.error
    compat.apply()
    try:
        fixed, _ = run_recipe(_tiny, DEVICE, offloaded=(1, 2), num_steps=4, reference=grads)
    finally:
        compat.revert()
    assert fixed.ok, fixed.error
    assert fixed.num_offloaded_layers == 2
    assert fixed.losses[-1] < fixed.losses[0]
    assert fixed.max_grad_rel_diff < 1e-3
