"""Data parallel on 2 GPUs as the README runs it (`torchrun --nproc-per-node 2 -m streamtune train`): NCCL,
one pinned shared host copy, and the same adapter as one GPU computing the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from streamtune.cli import main
from streamtune.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


def _config(path: Path, run_dict, run_dir: Path, grad_accum: int, overlap: bool = False, backend: str = "auto") -> Path:
    raw = run_dict(run_dir, train={"device": "cuda", "max_steps": 3, "lr": 1e-2, "grad_accum": grad_accum,
                                   "overlap_grad_reduce": overlap, "dist_backend": backend},
                   model={"dtype": "float32"}, memory={"stream": "all"})
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("backend,overlap", [("auto", False), ("auto", True), ("gloo", False), ("gloo", True)],
                         ids=["flat-all-reduce", "overlapped-buckets", "gloo-through-host", "gloo-buckets"])
def test_two_gpus_match_one_gpu(tmp_path, run_dict, backend, overlap):
    two = _config(tmp_path / "two.yaml", run_dict, tmp_path / "two", grad_accum=1, overlap=overlap, backend=backend)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), STREAMTUNE_DIST_TIMEOUT_S="120")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "streamtune", "train", str(two)]
    log = tmp_path / "torchrun.log"  # kept on disk: a run cut by an outer timeout still leaves its output
    with log.open("w") as out:
        try:
            returncode = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300).returncode
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun ran past 300 s; its output ({log}):\n{log.read_text()[-3000:]}")
    assert returncode == 0, log.read_text()[-3000:]
    one = _config(tmp_path / "one.yaml", run_dict, tmp_path / "one", grad_accum=2)
    assert main(["train", str(one)]) == 0
    placement = json.loads((tmp_path / "two" / "placement.json").read_text())
    shared = placement["shared_host"]
    assert placement["device"] == "cuda:0" and shared["layers"] == shared["pinned_layers"] > 0
    assert placement["dist_backend"] == ("nccl" if backend == "auto" else backend)
    a = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=5e-4, msg=name)
    for x, y in zip(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4) and x["tokens"] == y["tokens"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)
