"""Placement, memory components, step time, errors and JSON of the planner."""

from __future__ import annotations

import json
import re

import pytest

from streamtune.errors import InputError
from streamtune.plan import GPU_PROFILES, even_indices, format_table, make_plan
from streamtune.plan import memory, planner, timing
from streamtune.plan.profiles import replace

GIB = 2**30
BIG = "gemma4-26b-a4b"


def _plan(**kwargs):
    kwargs.setdefault("gpu", "rtx4090")
    kwargs.setdefault("host_budget_bytes", 512 * GIB)
    return make_plan(BIG, **kwargs)


@pytest.mark.parametrize("num_layers,count", [(30, 1), (30, 7), (30, 22), (30, 30), (48, 13), (4, 3)])
def test_even_indices_are_spread(num_layers, count):
    idx = even_indices(num_layers, count)
    assert idx == sorted(set(idx)) and len(idx) == count
    assert 0 <= idx[0] and idx[-1] < num_layers
    stretch = num_layers / count
    for j, i in enumerate(idx):
        assert j * stretch <= i < (j + 1) * stretch


def test_even_indices_edges():
    assert even_indices(30, 0) == []
    assert even_indices(30, 30) == list(range(30))
    picked = even_indices(30, 10)
    assert len(picked) == 10 and all(b - a == 3 for a, b in zip(picked, picked[1:]))
    assert even_indices(4, 2) == [1, 3]


def test_auto_streams_the_fewest_layers_that_fit():
    plan = _plan(codec="int8", gpu_budget_bytes=24 * GIB)
    num = len(plan.streamed_indices)
    assert 0 < num < 30 and plan.fits
    assert plan.streamed_indices == even_indices(30, num)
    assert sorted(plan.streamed_indices + plan.resident_indices) == list(range(30))
    sized = planner.size_model(planner._META_CACHE[BIG][0], "int8", 16,
                               planner._targets(planner._META_CACHE[BIG][0], "auto"), [],
                               model=planner._META_CACHE[BIG][1])
    settings = planner._Settings("int8", 2048, 16, True, "auto", 2, 1024)
    _, _, fewer = planner._evaluate(sized, settings, num - 1)
    assert sum(fewer.values()) > 24 * GIB
    assert [x.placement for x in plan.layers].count("streamed") == num


def test_more_budget_streams_fewer_layers_and_is_not_slower():
    small, large = _plan(gpu_budget_bytes=16 * GIB), _plan(gpu_budget_bytes=40 * GIB)
    assert len(large.streamed_indices) < len(small.streamed_indices)
    assert large.step_seconds <= small.step_seconds


def test_stream_modes():
    every = _plan(stream="all", gpu_budget_bytes=80 * GIB)
    assert every.streamed_indices == list(range(30)) and every.ring_slots == 2
    none = _plan(stream="none", codec="nf4", gpu_budget_bytes=80 * GIB)
    assert none.streamed_indices == [] and none.ring_slots == 0 and none.gpu_bytes["ring"] == 0


def test_gpu_components_follow_the_engine_layout():
    for codec in ("bf16", "int8"):
        plan = _plan(codec=codec, gpu_budget_bytes=20 * GIB)
        streamed = [x for x in plan.layers if x.placement == "streamed"]
        resident = [x for x in plan.layers if x.placement == "resident"]
        sized = {x.index: x for x in planner.size_model(
            planner._META_CACHE[BIG][0], codec, 16, planner._targets(planner._META_CACHE[BIG][0], "auto"), [],
            model=planner._META_CACHE[BIG][1]).layers}
        assert plan.gpu_bytes["ring"] == 2 * max(x.bytes for x in streamed)
        workspace = max(sized[x.index].decoded_bytes for x in plan.layers) if codec != "bf16" else 0
        assert plan.gpu_bytes["decode_workspace"] == workspace
        assert plan.gpu_bytes["resident_layers"] == sum(x.bytes for x in resident)
        assert (plan.gpu_bytes["decode_workspace"] > 0) == (codec != "bf16")
        assert plan.host_bytes["pinned_weights"] == sum(x.bytes for x in plan.layers)
        assert plan.gpu_bytes["cuda_context"] == memory.CUDA_CONTEXT_BYTES
        assert plan.gpu_peak_bytes == sum(plan.gpu_bytes.values())


def test_compressed_codecs_shrink_host_and_transfer():
    plans = {c: _plan(codec=c, stream="all", gpu_budget_bytes=80 * GIB) for c in ("bf16", "int8", "nf4")}
    assert plans["bf16"].host_peak_bytes > plans["int8"].host_peak_bytes > plans["nf4"].host_peak_bytes
    transfer = {c: p.timing["transfer_seconds"] for c, p in plans.items()}
    assert transfer["bf16"] > transfer["int8"] > transfer["nf4"]


def test_step_time_is_per_pass_max_and_names_the_limit():
    slow_link = replace(GPU_PROFILES["h100"], h2d_gbps=1.0)
    fast_link = replace(GPU_PROFILES["h100"], h2d_gbps=1e6)
    slow = _plan(stream="all", link=slow_link, gpu_budget_bytes=80 * GIB, kernels="eager")
    fast = _plan(stream="all", link=fast_link, gpu_budget_bytes=80 * GIB, kernels="eager")
    assert slow.limited_by == "transfer" and fast.limited_by == "compute"
    fused = _plan(stream="all", link=fast_link, gpu_budget_bytes=80 * GIB)
    for plan in (slow, fast, fused):
        t = plan.timing
        expected = sum(max(t[f"compute_{p}_seconds"], t[f"compute_cpu_{p}_seconds"], t[f"transfer_{p}_seconds"])
                       for p in ("forward", "backward")) + t["compute_optimizer_seconds"]
        assert plan.step_seconds == pytest.approx(expected)
        assert plan.tokens_per_second == pytest.approx(2048 / plan.step_seconds)
    # The backward reuses the last ring_slots layers of the forward without a copy.
    assert slow.timing["transfer_backward_seconds"] < slow.timing["transfer_forward_seconds"]
    # The fast kernels: the host issues every layer pass (forward, recompute, backward).
    num_layers = len(fused.layers)
    costs = timing.kernel_costs("auto")
    assert fused.timing["host_seconds"] == pytest.approx(3 * num_layers * costs.cpu_s_per_layer_pass)
    assert fast.timing["host_seconds"] == 0


def test_compiled_layers_are_the_default_cost_model_and_issue_faster():
    assert timing.cost_model("auto", None) == timing.cost_model("auto", True) == "compiled"
    assert timing.cost_model("auto", False) == "fast" and timing.cost_model("eager", True) == "eager"
    assert timing.kernel_costs("auto") is timing.KERNEL_COSTS["compiled"]
    compiled = _plan(stream="all", gpu_budget_bytes=80 * GIB)
    uncompiled = _plan(stream="all", gpu_budget_bytes=80 * GIB, kernels="fast")
    assert compiled.timing["host_seconds"] < uncompiled.timing["host_seconds"]
    assert compiled.step_seconds <= uncompiled.step_seconds  # (this one waits on the copies either way)
    assert compiled.gpu_peak_bytes == uncompiled.gpu_peak_bytes  # the same tensors live


def test_a_run_without_compiled_layers_is_planned_as_one():
    from streamtune.config import from_dict
    from streamtune.plan.planner import plan_for_run

    raw = {"model": {"name": "gemma4-26b-a4b"}, "data": {"path": "x.jsonl"}, "memory": {"gpu_budget": "24GiB"},
           "train": {"device": "cuda"}}
    default = plan_for_run(from_dict(raw), link=GPU_PROFILES["h200"])
    raw["train"]["compile_layers"] = False
    off = plan_for_run(from_dict(raw), link=GPU_PROFILES["h200"])
    assert off.timing["host_seconds"] > default.timing["host_seconds"]


def test_fast_kernels_plan_less_loss_and_mask_memory():
    eager = _plan(stream="all", gpu_budget_bytes=80 * GIB, kernels="eager", tokens=8192)
    fused = _plan(stream="all", gpu_budget_bytes=80 * GIB, tokens=8192)
    assert fused.gpu_bytes["activations_masks"] == 0 < eager.gpu_bytes["activations_masks"]
    assert fused.gpu_peak_bytes < eager.gpu_peak_bytes
    # the fast experts keep less; at 8192 tokens the wide-head attention's chunk workspace outweighs that
    short_eager = _plan(stream="all", gpu_budget_bytes=80 * GIB, kernels="eager", tokens=2048)
    short_fused = _plan(stream="all", gpu_budget_bytes=80 * GIB, tokens=2048)
    assert short_fused.gpu_bytes["activations_recompute"] < short_eager.gpu_bytes["activations_recompute"]
    assert fused.gpu_bytes["activations_recompute"] > eager.gpu_bytes["activations_recompute"]


def test_the_wide_attention_workspace_counts_for_wide_heads_at_long_sequences_only():
    from streamtune.plan import memory
    from streamtune.plan.planner import _meta, _targets
    from streamtune.plan.sizing import size_model

    name, config, meta = _meta("gemma4-26b-a4b", False)
    model = size_model(config, "int8", 16, _targets(config, None), [], model=meta, name=name)
    wide = [layer for layer in model.layers if layer.shape.q_width // layer.shape.num_heads > 256]
    narrow = [layer for layer in model.layers if layer.shape.q_width // layer.shape.num_heads <= 256]
    assert wide and narrow
    assert memory.wide_attention_bytes(wide[0], 8192) > 2**30
    assert memory.wide_attention_bytes(wide[0], 2048) == 0 == memory.wide_attention_bytes(narrow[0], 8192)


def test_the_fused_loss_and_the_layer_recompute_are_not_live_together():
    """The fused loss frees each logits chunk before a layer recomputes: the peak holds the larger working set."""
    from streamtune.plan import memory
    from streamtune.plan.sizing import size_model
    from streamtune.models.build import resolve_config

    config = resolve_config("gemma4-26b-a4b")
    sized = size_model(config, "int8", 16, ["q_proj"], [])
    for tokens, chunk in ((8192, 1024), (512, 512)):
        fused = memory.activation_bytes(sized, tokens, chunk, checkpointing=True, fused=True)
        eager = memory.activation_bytes(sized, tokens, chunk, checkpointing=True, fused=False)
        loss = memory.loss_bytes(sized, tokens, chunk, fused=True)
        assert loss * 5 == eager["loss"]  # one bf16 chunk and its gradient, not five fp32 copies
        assert fused["loss"] + fused["recompute"] == max(loss, fused["recompute"])


def test_checkpointing_costs_a_recompute():
    on = _plan(codec="nf4", stream="none", gpu_budget_bytes=80 * GIB)
    off = _plan(codec="nf4", stream="none", gpu_budget_bytes=80 * GIB, gradient_checkpointing=False)
    assert on.timing["compute_seconds"] > off.timing["compute_seconds"]
    assert on.gpu_peak_bytes < off.gpu_peak_bytes


def test_expert_lora_adds_state_and_fold_memory_only_when_eager():
    base = _plan(codec="nf4", gpu_budget_bytes=80 * GIB)
    experts = _plan(codec="nf4", gpu_budget_bytes=80 * GIB,
                    lora_target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    assert experts.lora_trainable_params > 20 * base.lora_trainable_params
    assert experts.gpu_bytes["lora_state"] == 16 * experts.lora_trainable_params
    # PEFT folds W + BA (eager); the fast kernels' grouped low-rank products fold nothing
    eager = _plan(codec="nf4", gpu_budget_bytes=80 * GIB, kernels="eager",
                  lora_target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    assert eager.gpu_bytes["activations_recompute"] > base.gpu_bytes["activations_recompute"] + GIB
    # the grouped low-rank path keeps its two inputs per routed token (hidden + expert FFN), no fold
    added = experts.gpu_bytes["activations_recompute"] - base.gpu_bytes["activations_recompute"]
    shape = max((layer.shape for layer in _sized_26b_layers()), key=lambda s: s.q_width)
    assert added == shape.top_k * (shape.hidden + shape.expert_ffn) * 2048 * 2
    assert experts.step_seconds < eager.step_seconds


def _sized_26b_layers():
    from streamtune.models.build import resolve_config
    from streamtune.plan.sizing import size_model

    return size_model(resolve_config("gemma4-26b-a4b"), "nf4", 16, ["q_proj"], []).layers


def _gib_in(text: str, label: str) -> float:
    return float(re.search(label + r" ([0-9.]+) GiB", text).group(1))


def test_check_says_by_how_much_and_which_knobs_fix_it():
    plan = _plan(gpu_budget_bytes=6 * GIB)
    assert not plan.fits
    with pytest.raises(InputError) as info:
        plan.check()
    text = str(info.value)
    over = (plan.gpu_peak_bytes - plan.gpu_budget_bytes) / GIB
    assert _gib_in(text, "by") == pytest.approx(over, abs=0.006)
    assert "tensor group" in text and "knobs that fix it" in text
    tokens = int(re.search(r"--tokens (\d+)", text).group(1))
    assert _plan(gpu_budget_bytes=6 * GIB, tokens=tokens).fits_gpu
    assert not _plan(gpu_budget_bytes=6 * GIB, tokens=tokens * 2).fits_gpu
    needed = _gib_in(text, "--gpu-memory")
    assert _plan(gpu_budget_bytes=int((needed + 0.01) * GIB)).fits_gpu


def test_codec_knob_and_host_shortfall():
    plan = _plan(stream="none", gpu_budget_bytes=24 * GIB)
    text = plan.shortfall_text()
    assert "--stream auto" in text and "--codec" in text
    host = _plan(gpu_budget_bytes=24 * GIB, host_budget_bytes=8 * GIB)
    assert not host.fits_host and "exceeds the host budget" in host.shortfall_text()
    assert "--host-memory" in host.shortfall_text()


@pytest.mark.parametrize("kwargs,key", [
    ({"codec": "fp8"}, "codec"), ({"tokens": 0}, "tokens"), ({"lora_rank": -1}, "lora_rank"),
    ({"stream": "some"}, "stream"), ({"ring_slots": 0}, "ring_slots"), ({"gpu": "tpu"}, "--gpu"),
])
def test_bad_inputs_name_the_field(kwargs, key):
    with pytest.raises(InputError, match=re.escape(key)):
        make_plan("tiny-llama", **kwargs)


def test_unknown_model_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="preset"):
        make_plan("no-such-model")
    with pytest.raises(InputError, match="config.json"):
        make_plan(str(tmp_path))


def test_local_directory_reads_only_config_json(tmp_path):
    from streamtune.models.presets import preset_config

    preset_config("tiny-qwen3-moe").save_pretrained(tmp_path)
    from_dir = make_plan(str(tmp_path), gpu="h100")
    from_preset = make_plan("tiny-qwen3-moe", gpu="h100")
    assert [x.bytes for x in from_dir.layers] == [x.bytes for x in from_preset.layers]
    assert from_dir.lora_trainable_params == from_preset.lora_trainable_params


def test_json_keys_and_table():
    plan = _plan(codec="int8", gpu_budget_bytes=24 * GIB)
    data = json.loads(json.dumps(plan.to_dict()))
    for key in ("fits", "gpu_peak_bytes", "host_peak_bytes", "step_seconds", "tokens_per_second", "limited_by",
                "layers"):
        assert key in data
    assert data["limited_by"] in ("compute", "transfer")
    assert {"index", "placement", "codec", "bytes"} <= set(data["layers"][0])
    assert {x["placement"] for x in data["layers"]} == {"resident", "streamed"}
    table = format_table(plan)
    assert "GPU peak / budget" in table and "limited by" in table and "streamed (" in table


def test_plan_for_run_uses_the_config():
    from streamtune.config import RunConfig
    from streamtune.plan import plan_for_run

    cfg = RunConfig()
    cfg.model.name, cfg.data.seq_len, cfg.train.batch_size = "tiny-llama", 256, 2
    cfg.memory.gpu_budget, cfg.memory.codec, cfg.lora.rank = "2GiB", "int8", 8
    plan = plan_for_run(cfg, link=GPU_PROFILES["h100"])
    assert (plan.tokens, plan.codec, plan.lora_rank, plan.gpu_budget_bytes) == (512, "int8", 8, 2 * GIB)
    nccl = plan_for_run(cfg, link=GPU_PROFILES["h100"], local_ranks=2)
    cfg.train.dist_backend = "gloo"
    gloo = plan_for_run(cfg, link=GPU_PROFILES["h100"], local_ranks=2)
    assert gloo.host_bytes["runtime"] < nccl.host_bytes["runtime"]  # train.dist_backend reaches the host line


def test_wide_heads_at_long_sequences_plan_the_faster_wide_attention(monkeypatch):
    import dataclasses

    from streamtune.plan import timing
    from streamtune.plan.planner import _meta, _targets
    from streamtune.plan.sizing import size_model

    costs = timing.KERNEL_COSTS["compiled"]
    name, config, meta = _meta("gemma4-26b-a4b", False)
    model = size_model(config, "int8", 16, _targets(config, None), [], model=meta, name=name)
    wide = next(layer for layer in model.layers if layer.shape.q_width // layer.shape.num_heads > 256)
    narrow = next(layer for layer in model.layers if layer.shape.q_width // layer.shape.num_heads <= 256)
    assert costs.layer_attention_efficiency(wide, 8192) == timing.WIDE_ATTENTION_EFFICIENCY > costs.attention_efficiency
    assert costs.layer_attention_efficiency(wide, 2048) == costs.attention_efficiency
    assert costs.layer_attention_efficiency(narrow, 8192) == costs.attention_efficiency
    with_wide = _plan(tokens=8192, gpu="h200").timing["compute_forward_seconds"]
    monkeypatch.setitem(timing.KERNEL_COSTS, "compiled", dataclasses.replace(costs, wide_attention_efficiency=None))
    assert _plan(tokens=8192, gpu="h200").timing["compute_forward_seconds"] > with_wide
