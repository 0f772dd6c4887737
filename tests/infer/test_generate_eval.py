"""generate and eval on the engine: resident == streamed, adapters load exactly, checkpoints are adapters."""

from __future__ import annotations

import math

import pytest
import torch

from streamtune.errors import InputError
from streamtune.infer import InferenceOptions, SamplingOptions, evaluate_file, generate, open_model
from tests.infer.runs import eval_losses

GREEDY = SamplingOptions(max_new_tokens=6)


def _open(spec, stream="none"):
    return open_model(str(spec), InferenceOptions(device="cpu", stream=stream, max_tokens=64))


def test_eval_of_each_checkpoint_matches_the_run_eval(tiny_run):
    logged = eval_losses(tiny_run)
    eval_file = tiny_run.parent / "eval.jsonl"
    for step in (1, 2):
        with _open(tiny_run / "checkpoints" / f"step-{step}") as loaded:
            result = evaluate_file(loaded, str(eval_file), batch_size=2)
        assert math.isclose(result.loss, logged[step], rel_tol=1e-5), (step, result.loss, logged[step])
        assert math.isclose(result.perplexity, math.exp(result.loss), rel_tol=1e-9)
    assert logged[1] != logged[2]


def test_streamed_equals_resident_for_generate_and_eval(tiny_run):
    eval_file = tiny_run.parent / "eval.jsonl"
    outputs = {}
    for stream in ("none", "all"):
        with _open(tiny_run, stream) as loaded:
            assert loaded.placement.describe()["streamed_layers"] == ([] if stream == "none" else [0, 1, 2, 3])
            prompt = torch.tensor([[2, 40, 41, 42, 43]])
            with torch.no_grad():
                logits = loaded.model(input_ids=prompt).logits
            outputs[stream] = (generate(loaded, "Name three colors.", GREEDY), logits,
                               evaluate_file(loaded, str(eval_file)).loss)
    assert outputs["none"][0] == outputs["all"][0]
    torch.testing.assert_close(outputs["none"][1], outputs["all"][1], rtol=1e-5, atol=1e-5)
    assert math.isclose(outputs["none"][2], outputs["all"][2], rel_tol=1e-6)


def test_adapter_changes_the_model_and_base_is_the_preset(tiny_run):
    eval_file = tiny_run.parent / "eval.jsonl"
    with _open("tiny-gemma4") as base:
        base_loss = evaluate_file(base, str(eval_file), seq_len=32, batch_size=2).loss
    with _open(tiny_run / "adapter") as adapted:
        adapted_loss = evaluate_file(adapted, str(eval_file), batch_size=2).loss
    assert adapted_loss < base_loss - 1e-3


def test_sampling_is_seeded(tiny_run):
    with _open(tiny_run) as loaded:
        texts = [generate(loaded, "Hello", SamplingOptions(max_new_tokens=8, temperature=1.0, top_k=50, seed=s))
                 for s in (1, 1)]
    assert texts[0] == texts[1]


def test_checkpoint_loads_in_stock_peft(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_run / "base"))
    model = PeftModel.from_pretrained(base, str(tiny_run / "checkpoints" / "step-1"))
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora and any(float(p.abs().sum()) > 0 for p in lora.values())


def test_bad_sampling_options_are_input_errors():
    with pytest.raises(InputError, match="--top-p"):
        SamplingOptions(top_p=0.0).check()
    with pytest.raises(InputError, match="--temperature"):
        SamplingOptions(temperature=-1).check()


def test_bare_base_is_packed_and_streamed():
    prompt = torch.tensor([[2, 40, 41, 42, 43, 44]])
    logits = {}
    for stream in ("none", "all"):
        with _open("tiny-gemma4", stream) as loaded:
            assert loaded.placement.engine.host_bytes > 0
            assert not any(p.requires_grad for p in loaded.model.parameters())
            with torch.no_grad():
                logits[stream] = loaded.model(input_ids=prompt).logits
            text = generate(loaded, "Hello there", GREEDY)
            logits[stream + "-text"] = text
    torch.testing.assert_close(logits["none"], logits["all"], rtol=1e-5, atol=1e-5)
    assert logits["none-text"] == logits["all-text"]
