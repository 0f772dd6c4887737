"""generate on CUDA with every decoder layer streamed (KV cache on the GPU), against the resident model."""

from __future__ import annotations

import pytest
import torch

from streamtune.infer import InferenceOptions, SamplingOptions, evaluate_file, generate, open_model
from tests.infer.runs import train_tiny_run

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cpu_trained_run(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return train_tiny_run(tmp_path_factory.mktemp("gpu_run"))


@pytest.mark.parametrize("codec", ["bf16", "int8", "nf4"])
def test_generate_streamed_on_cuda(cpu_trained_run, codec):
    sampling = SamplingOptions(max_new_tokens=16)
    results = {}
    for stream in ("none", "all"):
        options = InferenceOptions(device="cuda", dtype="float32", codec=codec, stream=stream, max_tokens=128)
        with open_model(str(cpu_trained_run), options) as loaded:
            assert loaded.device.type == "cuda"
            described = loaded.placement.describe()
            assert described["streamed_layers"] == ([] if stream == "none" else [0, 1, 2, 3])
            loaded.placement.step_metrics()
            torch.cuda.reset_peak_memory_stats()
            text = generate(loaded, "Name three colors.", sampling)
            copied = loaded.placement.step_metrics()["h2d_bytes"]
            loss = evaluate_file(loaded, str(cpu_trained_run.parent / "eval.jsonl"), batch_size=2).loss
            results[stream] = (text, loss, copied)
    assert results["none"][0] == results["all"][0]
    assert abs(results["none"][1] - results["all"][1]) < 1e-4
    assert results["none"][2] == 0 and results["all"][2] > 0
