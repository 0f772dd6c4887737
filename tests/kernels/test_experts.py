"""Expert LoRA as grouped low-rank products: the numbers of PEFT's target_parameters path, without W + BA."""

from __future__ import annotations

import json

import pytest
import torch

from streamtune.config import LoraConfig
from streamtune.kernels import apply_kernels, calls, reset, select_kernels
from streamtune.kernels.experts import restore_stock_expert_lora, route, use_fast_expert_lora
from streamtune.lora import attach_lora
from streamtune.models.build import build_model
from tests.kernels.steps import labelled_batch, loss_and_grads, perturb_for_checks

EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
MOE_MODELS = ["tiny-gemma4", "tiny-qwen3-moe", "tiny-mixtral"]
ROUTES = ["loop"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])


def _expert_lora_model(name, targets=None):
    model, adapter = build_model(name, torch.float32, seed=1)
    cfg = LoraConfig(rank=4, alpha=8, target_parameters=EXPERT_PARAMS)
    if targets is not None:
        cfg.targets = targets
    model = attach_lora(model, adapter, cfg, seed=0)
    perturb_for_checks(model)
    return model, adapter


def _experts_modules(model):
    return [m for name, m in model.named_modules() if name.endswith("experts") and hasattr(m, "parameter_name")]


def _module_run(module, tokens=40, skewed=False, seed=0):
    """Forward + backward of an experts module; ``skewed``: every token goes to the same two experts."""
    base = module.get_base_layer()
    hidden, num_experts = base.down_proj.shape[1], base.num_experts
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    if skewed:
        index = torch.randperm(num_experts, generator=gen)[:2].repeat(tokens, 1)
    else:
        index = torch.stack([torch.randperm(num_experts, generator=gen)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=gen)
    module.zero_grad(set_to_none=True)
    out = module(x, index, weights)
    (out * torch.linspace(-1, 1, hidden)).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


def _assert_close_runs(got, ref, tol=1e-5):
    torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=tol * max(1.0, float(ref[0].abs().max())))
    torch.testing.assert_close(got[1], ref[1], rtol=tol, atol=tol * max(1.0, float(ref[1].abs().max())))
    for key, grad in ref[2].items():
        torch.testing.assert_close(got[2][key], grad, rtol=tol, atol=tol * float(grad.abs().max()), msg=key)


def test_route_offsets_are_cumulative_counts_and_skip_unhit_experts():
    index = torch.tensor([[3, 0], [3, 1], [0, 3]])
    sorted_ids, perm, offsets = route(index, 5)
    assert sorted_ids.tolist() == [0, 0, 1, 3, 3, 3]
    assert offsets.dtype == torch.int32 and offsets.tolist() == [2, 3, 3, 6, 6]
    assert torch.equal(index.reshape(-1)[perm], sorted_ids)


@pytest.mark.parametrize("route_name", ROUTES)
@pytest.mark.parametrize("name", MOE_MODELS)
def test_fp32_experts_forward_backward_equals_peft_target_parameters(name, route_name):
    model, _ = _expert_lora_model(name)
    module = _experts_modules(model)[0]
    ref = _module_run(module)
    skewed_ref = _module_run(module, skewed=True, seed=1)  # most experts get no token
    assert use_fast_expert_lora(model, route_name) == model.config.num_hidden_layers
    reset()
    _assert_close_runs(_module_run(module), ref)
    _assert_close_runs(_module_run(module, skewed=True, seed=1), skewed_ref)
    assert calls("expert_lora") == 2 and calls(f"expert_lora_{route_name}") == 2


@pytest.mark.parametrize("name", MOE_MODELS)
def test_fp32_model_loss_and_lora_grads_equal_peft(name):
    model, adapter = _expert_lora_model(name, targets=["q_proj"])
    batch = labelled_batch(model.config.vocab_size)
    ref_loss, ref_grads = loss_and_grads(model, adapter, batch)
    for route_name in ROUTES:
        use_fast_expert_lora(model, route_name)
        reset()
        loss, grads = loss_and_grads(model, adapter, batch)
        assert calls("expert_lora") == model.config.num_hidden_layers
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for key, ref in ref_grads.items():
            torch.testing.assert_close(grads[key], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=key)
        restore_stock_expert_lora(model)


def test_auto_takes_the_fast_path_and_eager_keeps_peft():
    model, adapter = _expert_lora_model("tiny-gemma4")
    batch = labelled_batch(model.config.vocab_size)
    eager = select_kernels("eager", "cpu", "float32")
    applied = apply_kernels(model, eager)
    assert applied["expert_lora_modules"] == 0 and eager.expert_lora is None
    assert all("forward" not in vars(m) for m in _experts_modules(model))  # PEFT's own ParamWrapper.forward
    reset()
    loss_and_grads(model, adapter, batch, eager)
    assert calls("expert_lora") == 0
    auto = select_kernels("auto", "cpu", "float32")
    assert auto.expert_lora == "loop" and auto.describe()["expert_lora"] == "loop"
    assert apply_kernels(model, auto)["expert_lora_modules"] == model.config.num_hidden_layers
    loss_and_grads(model, adapter, batch, auto)
    assert calls("expert_lora") == calls("expert_lora_loop") == model.config.num_hidden_layers


def test_selection_by_device():
    assert select_kernels("auto", "cuda", "bfloat16", (9, 0)).expert_lora == "grouped_mm"
    assert select_kernels("auto", "cuda", "bfloat16", (8, 9)).expert_lora == "grouped_mm"
    assert select_kernels("auto", "cuda", "float16", (7, 5)).expert_lora == "loop"
    assert select_kernels("eager", "cuda", "bfloat16", (9, 0)).expert_lora is None
    with pytest.raises(ValueError, match="route"):
        use_fast_expert_lora(torch.nn.Linear(2, 2), "fast")


def test_weight_is_read_at_call_time_as_the_engine_binds_it():
    model, _ = _expert_lora_model("tiny-gemma4")
    module = _experts_modules(model)[0]
    base = module.get_base_layer()
    use_fast_expert_lora(model, "loop")
    fast_before = _module_run(module)
    new_weight = torch.randn_like(base.gate_up_proj)
    base.gate_up_proj.data = new_weight  # what offload.host.bind does with a decoded workspace view
    fast_after = _module_run(module)
    restore_stock_expert_lora(model)
    _assert_close_runs(fast_after, _module_run(module))
    assert not torch.allclose(fast_after[0], fast_before[0])


def test_disabled_or_merged_adapters_run_peft_own_path():
    model, _ = _expert_lora_model("tiny-gemma4")
    module = _experts_modules(model)[0]
    with model.disable_adapter():
        base_only = _module_run(module)
    use_fast_expert_lora(model, "loop")
    reset()
    with model.disable_adapter():
        _assert_close_runs(_module_run(module), base_only)
    assert calls("expert_lora") == 0
    fast = _module_run(module)
    module.merge()
    module.base_layer.merge()
    reset()
    merged = _module_run(module)
    assert calls("expert_lora") == 0
    torch.testing.assert_close(merged[0], fast[0], rtol=1e-4, atol=1e-4 * float(fast[0].abs().max()))


def test_recipe_auto_and_eager_train_alike_with_expert_lora(tmp_path, write_config):
    from safetensors.torch import load_file

    from streamtune.cli import main

    runs = {}
    for mode in ("eager", "auto"):
        path = write_config(f"{mode}.yaml", lora={"target_parameters": EXPERT_PARAMS},
                            train={"kernels": mode, "max_steps": 6, "lr": 1e-2},
                            output={"dir": str(tmp_path / mode), "progress": False})
        reset()
        assert main(["train", str(path)]) == 0
        run = tmp_path / mode
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        kernels = json.loads((run / "placement.json").read_text())["kernels"]
        runs[mode] = (losses, kernels, load_file(str(run / "adapter" / "adapter_model.safetensors")),
                      calls("expert_lora"))
    (eager, eager_kernels, eager_adapter, eager_calls), (auto, auto_kernels, auto_adapter, auto_calls) = \
        runs["eager"], runs["auto"]
    assert eager_calls == 0 and eager_kernels["expert_lora_modules"] == 0
    assert auto_calls > 0 and auto_kernels["expert_lora_modules"] == 4 and auto_kernels["expert_lora"] == "loop"
    assert len(auto) == len(eager) == 6
    for a, e in zip(auto, eager):
        assert abs(a - e) <= 1e-3 * abs(e), (auto, eager)
    assert auto_adapter.keys() == eager_adapter.keys()
    assert any("experts" in key for key in auto_adapter)
    for key, value in eager_adapter.items():
        assert auto_adapter[key].shape == value.shape
        torch.testing.assert_close(auto_adapter[key], value, rtol=1e-2, atol=1e-4)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_a_failing_grouped_mm_falls_back_to_the_loop_once(monkeypatch):
    import streamtune.kernels.experts as experts

    model, _ = _expert_lora_model("tiny-gemma4")
    module = _experts_modules(model)[0]
    ref = _module_run(module)
    use_fast_expert_lora(model, "grouped_mm")

    def refuse(*args, **kwargs):
        raise RuntimeError("grouped gemm is not supported on this card")

    monkeypatch.setattr(experts, "_grouped_kernel", refuse)
    monkeypatch.setattr(experts, "_GROUPED_MM_FAILURE", [])
    reset()
    with pytest.warns(RuntimeWarning, match="grouped_mm failed for the experts.*per-expert loop"):
        got = _module_run(module)
    _assert_close_runs(got, ref)
    _module_run(module)  # later calls take the loop without trying the kernel again
    assert calls("expert_lora_loop") == 2 and calls("expert_lora_grouped_mm") == 0
