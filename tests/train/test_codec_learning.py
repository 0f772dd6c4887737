"""A tiny model fine-tuned through the engine with int8/nf4 base weights still learns like bf16."""

import pytest

from streamtune import config
from tests.conftest import small_run_dict

MARGIN = 0.15  # final-loss gap to bf16 allowed (nats); bf16 falls by ~0.8 over these steps


def _run(tmp_path, codec: str, stream: str):
    raw = small_run_dict(tmp_path / f"run-{codec}-{stream}",
                         memory={"codec": codec, "stream": stream},
                         train={"max_steps": 24, "lr": 1e-2, "warmup_steps": 2, "save_every": 0})
    from streamtune.train import train

    return train(config.from_dict(raw)).losses


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bf16"), "bf16", "none")


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_compressed_base_learns_like_bf16(tmp_path, bf16_losses, codec):
    losses = _run(tmp_path, codec, "all")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    ref_first, ref_last = sum(bf16_losses[:3]) / 3, sum(bf16_losses[-3:]) / 3
    assert ref_first - ref_last > 0.3, "the bf16 reference must learn for the comparison to mean anything"
    assert first - last > 0.3
    assert last == pytest.approx(ref_last, abs=MARGIN)
