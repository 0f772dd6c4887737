"""The recipe on a CUDA device (bf16 base, fp32 LoRA, streamed layers): runs, reports GPU memory."""

from __future__ import annotations

import pytest
import torch

from streamtune.config import from_dict
from streamtune.train import train
from streamtune.train.metrics import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("stream", ["none", "all"])
def test_train_on_cuda(tmp_path, run_dict, stream):
    raw = run_dict(tmp_path / "run", train={"device": "cuda", "max_steps": 8, "lr": 1e-2}, memory={"stream": stream})
    result = train(from_dict(raw))
    records = read_metrics(tmp_path / "run")
    assert len(records) == 8 and all(r["gpu_peak_bytes"] > 0 for r in records)
    assert sum(result.losses[-2:]) < sum(result.losses[:2])
    assert {p.dtype for p in result.model.parameters() if p.requires_grad} == {torch.float32}
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
