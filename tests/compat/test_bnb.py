"""bitsandbytes entries (P1/P2/P9, P3, P11, N3, N4): each reproducer both ways."""

import pytest
import torch

from streamtune import compat
from streamtune.compat import bnb

bitsandbytes = pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")

INT8_IDS = ["P1", "P2", "P9", "N3"]


def test_offloaded_int8_backward_crashes_on_stock_stack():
    outcome = bnb.reproduce_offloaded_int8_backward()
    assert outcome.reproduces is True
    assert "SCB=None" in outcome.reason


def test_fix_makes_offloaded_int8_backward_match_resident():
    compat.apply(["P2"])
    assert "int8-offload-fresh-state" in compat.applied()
    assert bnb.reproduce_offloaded_int8_backward().reproduces is False
    layer = bnb.offloaded_int8_linear(seed=3)
    resident, _ = bnb.quantized_linear(seed=3)
    x = torch.randn(5, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    layer(x).float().pow(2).sum().backward()
    resident(x_ref).float().pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    # recompute (as gradient checkpointing does): a second forward+backward after the first
    y = torch.randn(5, 32, requires_grad=True)
    layer(y).sum().backward()
    assert torch.isfinite(y.grad).all()


def test_fix_releases_int8_matrix_and_reverts_exactly():
    import accelerate.hooks

    original = accelerate.hooks.AlignDevicesHook.__dict__["post_forward"]
    assert bnb.reproduce_int8_cb_kept().reproduces is True
    compat.apply(["N3"])
    assert accelerate.hooks.AlignDevicesHook.__dict__["post_forward"] is not original
    assert bnb.reproduce_int8_cb_kept().reproduces is False
    compat.revert()
    assert accelerate.hooks.AlignDevicesHook.__dict__["post_forward"] is original
    assert bnb.reproduce_int8_cb_kept().reproduces is True


def test_int8_ctx_activations_detected_and_absent_for_saved_tensors(monkeypatch):
    assert bnb.reproduce_int8_ctx_activations().reproduces is True

    def matmul_saving_properly(A, B, out=None, state=None, threshold=0.0, bias=None):
        weight = B.to(A.dtype) * (state.SCB.unsqueeze(1) / 127.0) if state.SCB is not None else B.to(A.dtype)
        return torch.nn.functional.linear(A, weight.detach(), bias)

    monkeypatch.setattr(bitsandbytes, "matmul", matmul_saving_properly)
    assert bnb.reproduce_int8_ctx_activations().reproduces is False


def test_int8params_kwargs_both_ways(monkeypatch):
    cls = bitsandbytes.nn.Int8Params
    assert bnb.reproduce_int8params_kwargs().reproduces is False
    current_new = cls.__dict__["__new__"]

    def strict_new(cls_, data=None, requires_grad=True, has_fp16_weights=False, CB=None, SCB=None):
        return current_new(cls_, data, requires_grad, has_fp16_weights, CB, SCB)

    monkeypatch.setattr(cls, "__new__", staticmethod(strict_new))  # bitsandbytes 0.49 signature
    assert bnb.reproduce_int8params_kwargs().reproduces is True
    assert "int8params-kwargs" in compat.apply(["P11"])
    assert bnb.reproduce_int8params_kwargs().reproduces is False
    param = cls(torch.zeros(2, 2, dtype=torch.int8), requires_grad=False, _is_hf_initialized=True)
    assert param.dtype == torch.int8 and param.SCB is None
    compat.revert()
    assert cls.__dict__["__new__"].__func__ is strict_new
    assert bnb.reproduce_int8params_kwargs().reproduces is True


def test_meta_scb_both_ways(monkeypatch):
    assert bnb.reproduce_meta_scb().reproduces is False
    linear = bitsandbytes.nn.Linear8bitLt

    def old_save(self, destination, prefix, keep_vars):  # pre-0.50: direct attribute access
        torch.nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        if self.weight.device.type == "meta":
            del self.weight.SCB
        destination[prefix + "SCB"] = self.weight.SCB

    monkeypatch.setattr(linear, "_save_to_state_dict", old_save)
    outcome = bnb.reproduce_meta_scb()
    assert outcome.reproduces is True and "SCB" in outcome.reason


def test_p9_checkpoint_recompute_of_offloaded_int8_layer():
    from torch.utils.checkpoint import checkpoint

    x_data = torch.randn(3, 32)

    def step():
        layer = bnb.offloaded_int8_linear(seed=5)
        x = x_data.clone().requires_grad_(True)
        checkpoint(layer, x, use_reentrant=False).float().pow(2).sum().backward()
        return x.grad

    with pytest.raises(AttributeError):
        step()
    compat.apply(["P9"])
    grad = step()
    resident, _ = bnb.quantized_linear(seed=5)
    x_ref = x_data.clone().requires_grad_(True)
    resident(x_ref).float().pow(2).sum().backward()
    torch.testing.assert_close(grad, x_ref.grad)
