"""Atomic checkpoints: round trip, latest complete one wins, leftovers ignored, RNG restored."""

from __future__ import annotations

import random

import pytest
import torch

from streamtune.errors import InputError
from streamtune.train import checkpoint as ckpt


def _state(step: int) -> ckpt.TrainState:
    param = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones_like(param)
    opt.step()
    return ckpt.TrainState(step=step, trainable={"a.lora_A.weight": param.detach().clone()},
                           optimizer=opt.state_dict(), scheduler={"last_epoch": step},
                           loader={"epoch": 1, "position": 7}, rng=ckpt.capture_rng(), extra={"note": "x"})


def test_round_trip_is_exact(tmp_path):
    state = _state(3)
    path = ckpt.save_checkpoint(tmp_path, state)
    assert path == tmp_path / "checkpoints" / "step-3"
    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 3 and loaded.loader == state.loader and loaded.extra == {"note": "x"}
    assert torch.equal(loaded.trainable["a.lora_A.weight"], state.trainable["a.lora_A.weight"])
    exp_avg = loaded.optimizer["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, state.optimizer["state"][0]["exp_avg"])
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_latest_complete_checkpoint_wins_and_partials_are_ignored(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(2))
    ckpt.save_checkpoint(tmp_path, _state(10))
    partial = tmp_path / "checkpoints" / ".tmp-step-12"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"truncated")
    broken = tmp_path / "checkpoints" / "step-11"
    broken.mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-10"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 10]
    ckpt.remove_partial(tmp_path)
    assert not partial.exists()


def test_no_checkpoint_is_a_clear_input_error(tmp_path):
    with pytest.raises(InputError, match="--resume: .*holds no complete checkpoint"):
        ckpt.latest_checkpoint(tmp_path)


def test_rng_restore_replays_the_same_numbers():
    state = ckpt.capture_rng()
    first = (torch.rand(4), random.random())
    torch.rand(10)
    ckpt.restore_rng(state)
    again = (torch.rand(4), random.random())
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
