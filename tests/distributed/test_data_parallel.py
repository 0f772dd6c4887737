"""Data parallel on the CPU with gloo: two ranks train the same adapter as one process with the same
global batch, a 2-rank checkpoint resumes on 1 rank, and a rank that dies ends the job quickly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from streamtune.cli import main
from streamtune.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
TRAIN = {"max_steps": STEPS, "save_every": 1, "lr": 1e-2, "batch_size": 2}
TIMEOUT_S = 20


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + str(REPO), OMP_NUM_THREADS="1",
               STREAMTUNE_DIST_TIMEOUT_S=str(TIMEOUT_S))
    env.update(extra)
    return env


def _config(path: Path, run_dict, run_dir: Path, grad_accum: int) -> Path:
    path.write_text(yaml.safe_dump(run_dict(run_dir, train={**TRAIN, "grad_accum": grad_accum},
                                            data={"eval_fraction": 0.05})))
    return path


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(got: dict, expected: dict) -> None:
    import torch

    assert got.keys() == expected.keys()
    for name in expected:
        # Adam moves each weight by about lr per step whatever the gradient size, so float noise in a near-zero
        # gradient shows up to ~lr/20 here; scale errors are caught by the grad_norm comparison instead.
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=5e-4, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_dict):
    """A 2-rank torchrun run (grad_accum 2, split 3:1 between the ranks) and a 1-process run
    (grad_accum 4): the same global batch of 4 micro-batches."""
    root = tmp_path_factory.mktemp("dp")
    two = _config(root / "two.yaml", run_dict, root / "two", grad_accum=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "streamtune", "train", str(two)]
    # the sums go through shared memory as a GPU job's would (on the CPU by default gloo sums them itself)
    env = _env(STREAMTUNE_RANK_MICRO_BATCHES="3,1", STREAMTUNE_LOCAL_SUM="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    one = _config(root / "one.yaml", run_dict, root / "one", grad_accum=4)
    code = main(["train", str(one)])
    return {"root": root, "two": root / "two", "one": root / "one", "proc": proc, "code": code}


def test_two_ranks_train_the_same_adapter_as_one_process(runs):
    proc = runs["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert runs["code"] == 0
    _assert_same_adapter(_adapter(runs["two"]), _adapter(runs["one"]))
    two, one = read_metrics(runs["two"]), read_metrics(runs["one"])
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # rank 0 alone wrote metrics
    for a, b in zip(two, one):
        assert a["tokens"] == b["tokens"] and a["loss_tokens"] == b["loss_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5)
    assert proc.stderr.count("adapter: ") == 1  # one summary, from rank 0
    # the summary counts every rank's sequences: 2 steps x (2 rows x 2 micro-batches x 2 ranks)
    assert f"steps: {STEPS} x 8 sequences (train.batch_size 2 x train.grad_accum 2 x 2 ranks) = 16 sequences" \
        in proc.stderr
    placement = json.loads((runs["two"] / "placement.json").read_text())
    assert placement["world_size"] == 2 and placement["dist_backend"] == "gloo"
    assert placement["gradient_sum"] == "shared memory"  # STREAMTUNE_LOCAL_SUM=1: as on GPUs of one host
    shared = placement["shared_host"]  # both ranks' layers came from one copy in shared memory
    num_layers = len(placement["streamed_layers"]) + len(placement["resident_layers"])
    assert shared["owner"] and shared["layers"] == num_layers == 4 and shared["bytes"] > 0
    assert not Path(shared["directory"]).exists()  # unlinked once both ranks had mapped it


@pytest.mark.parametrize("local_sum", ["0", "1"], ids=["gloo-sum", "shared-memory-sum"])
def test_overlapped_gradient_reduce_trains_the_same_adapter(runs, local_sum):
    """train.overlap_grad_reduce: rank 0 sums its buckets during its last backward; rank 1 computes no micro-batch
    in this split (4:0), so it starts all of them after; the adapter is the one process's. With gloo's own sum the
    buckets run asynchronously; through shared memory each is done when started."""
    root = runs["root"]
    raw = yaml.safe_load((root / "two.yaml").read_text())
    raw["train"]["overlap_grad_reduce"] = True
    raw["output"]["dir"] = str(root / f"overlap-{local_sum}")
    (root / "overlap.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "streamtune", "train", str(root / "overlap.yaml")]
    proc = subprocess.run(cmd, env=_env(STREAMTUNE_RANK_MICRO_BATCHES="4,0", STREAMTUNE_LOCAL_SUM=local_sum),
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = "gradient all-reduce: overlapped with each step's last backward, 1 bucket of"
    assert proc.stderr.count(said) == 1  # the path taken, said once (by rank 0)
    placement = json.loads((root / f"overlap-{local_sum}" / "placement.json").read_text())
    assert placement["gradient_sum"] == {"0": "gloo", "1": "shared memory"}[local_sum]
    _assert_same_adapter(_adapter(root / f"overlap-{local_sum}"), _adapter(runs["one"]))
    for a, b in zip(read_metrics(root / f"overlap-{local_sum}"), read_metrics(runs["one"])):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-4)


def test_two_rank_checkpoint_resumes_on_one_rank(runs, tmp_path, capsys):
    run = tmp_path / "resumed"
    shutil.copytree(runs["two"], run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS}")
    shutil.rmtree(run / "adapter")
    cfg = runs["root"] / "two.yaml"
    out = f"output.dir={run}"
    code = main(["train", str(cfg), out, "train.grad_accum=2", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "global batch" in err and "train.grad_accum=4" in err
    assert main(["train", str(cfg), out, "train.grad_accum=4", "--resume"]) == 0
    _assert_same_adapter(_adapter(run), _adapter(runs["one"]))


class _Rank:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


def test_micro_batch_selection_even_and_by_counts(monkeypatch):
    from streamtune.distributed.data_parallel import rank_micro_batches, take_step_batches
    from streamtune.errors import InputError

    def picks(rank, counts):
        return take_step_batches(iter(range(100)), 3, _Rank(rank, 2), counts)

    assert picks(0, None) == [0, 2, 4] and picks(1, None) == [1, 3, 5]
    assert picks(0, [4, 2]) == [0, 1, 2, 3] and picks(1, [4, 2]) == [4, 5]
    assert picks(1, [6, 0]) == []
    monkeypatch.setenv("STREAMTUNE_RANK_MICRO_BATCHES", "4,2")
    assert rank_micro_batches(3, 2) == [4, 2]
    for bad in ("4,1", "6", "a,b", "7,-1"):
        monkeypatch.setenv("STREAMTUNE_RANK_MICRO_BATCHES", bad)
        with pytest.raises(InputError, match="sum to train.grad_accum x ranks = 6"):
            rank_micro_batches(3, 2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_agents_meet_at_a_c10d_rendezvous_as_two_nodes(runs, run_dict):
    """Several machines as the README launches them (``torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint
    HOST:PORT``): two agents on this host stand for two nodes of one process each, and train the same adapter
    as one process with the same global batch."""
    root = runs["root"]
    cfg = _config(root / "nodes.yaml", run_dict, root / "nodes", grad_accum=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "two-nodes",
           "-m", "streamtune", "train", str(cfg)]
    agents = [subprocess.Popen(cmd, env=_env(), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], [out[-2000:] for out in outputs]
    assert sum(out.count("adapter: ") for out in outputs) == 1  # rank 0 alone wrote the adapter and summary
    _assert_same_adapter(_adapter(root / "nodes"), _adapter(runs["one"]))
    for a, b in zip(read_metrics(root / "nodes"), read_metrics(runs["one"]), strict=True):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert json.loads((root / "nodes" / "placement.json").read_text())["world_size"] == 2


@pytest.mark.slow  # two fresh processes plus up to the 20 s timeout
def test_a_killed_rank_ends_the_job_within_the_timeout(tmp_path, run_dict):
    cfg = _config(tmp_path / "run.yaml", run_dict, tmp_path / "run", grad_accum=1)
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, str(Path(__file__).with_name("worker.py")), str(cfg), "1", "1"]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    started = time.monotonic()
    _, err = procs[0].communicate(timeout=240)
    procs[1].wait(timeout=30)
    assert procs[1].returncode == -9
    assert procs[0].returncode == 1, err[-2000:]
    assert "another rank died or stalled" in err and "rank 0/2" in err
    # the survivor was blocked in step 2's collectives; it must not wait much past the timeout
    assert time.monotonic() - started < 200
    metrics = read_metrics(tmp_path / "run")
    assert [r["step"] for r in metrics] == [1]
