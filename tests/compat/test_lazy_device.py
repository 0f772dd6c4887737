"""P4-P7 on a simulated second device (PyTorch's lazy backend): absent on the stock path, detected when injected."""

import pytest
import torch

from streamtune.compat import lazy_device

pytest.importorskip("accelerate")
if lazy_device.lazy_available() is not None:
    pytest.skip("PyTorch lazy backend unavailable", allow_module_level=True)


def _all():
    lazy_device.clear_cache()
    return {i: lazy_device.reproduce_device(i) for i in lazy_device.DEVICE_IDS}


def test_device_entries_do_not_reproduce_through_device_map():
    names = ("chunk", "split", "data_ptr")
    before = {name: torch.Tensor.__dict__.get(name) for name in names}
    autocast_before = torch.is_autocast_enabled
    outcomes = _all()
    assert all(o.reproduces is False for o in outcomes.values()), outcomes
    assert {name: torch.Tensor.__dict__.get(name) for name in names} == before  # shims removed exactly
    assert torch.is_autocast_enabled is autocast_before


def test_rope_on_cpu_is_detected_as_p4(monkeypatch):
    from transformers.models.gemma4 import modeling_gemma4

    original = modeling_gemma4.apply_rotary_pos_emb

    def rope_from_cpu(x, cos, sin, *args, **kwargs):  # the published P4 condition, inside the layer
        return original(x, cos.cpu(), sin.cpu(), *args, **kwargs)

    monkeypatch.setattr(modeling_gemma4, "apply_rotary_pos_emb", rope_from_cpu)
    outcomes = _all()
    assert outcomes["P4"].reproduces is True, outcomes["P4"]
    assert all(outcomes[i].reproduces is None and "P4" in outcomes[i].reason for i in ("P5", "P6", "P7"))


def test_layer_scalar_on_cpu_is_detected_as_p7(monkeypatch):
    from transformers.models.gemma4 import modeling_gemma4

    layer_cls = modeling_gemma4.Gemma4TextDecoderLayer
    original = layer_cls.forward

    def scalar_left_on_cpu(self, *args, **kwargs):
        self.layer_scalar = self.layer_scalar.cpu()  # a one-element, not zero-dim, CPU tensor
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layer_cls, "forward", scalar_left_on_cpu)
    outcomes = _all()
    assert outcomes["P7"].reproduces is True, outcomes["P7"]
