"""A tiny model fine-tuned through the engine with int8/nf4 base weights still learns like bf16."""

import pytest

from streamtune import config
from tests.conftest import small_run_dict

MARGIN = 0.15  # final-loss gap to bf16 allowed (nats); bf16 falls by ~0.8 over these steps


def _run(tmp_path, codec: str, stream: str, run_dirs: dict | None = None):
    raw = small_run_dict(tmp_path / f"run-{codec}-{stream}",
                         memory={"codec": codec, "stream": stream},
                         train={"max_steps": 24, "lr": 1e-2, "warmup_steps": 2, "save_every": 0})
    from streamtune.train import train

    result = train(config.from_dict(raw))
    if run_dirs is not None:
        run_dirs[codec] = result.run_dir
    return result.losses


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bf16"), "bf16", "none")


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_compressed_base_learns_like_bf16(tmp_path, bf16_losses, codec):
    run_dirs = {}
    losses = _run(tmp_path, codec, "all", run_dirs)
    _check_recorded_codecs(run_dirs[codec], codec)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    ref_first, ref_last = sum(bf16_losses[:3]) / 3, sum(bf16_losses[-3:]) / 3
    assert ref_first - ref_last > 0.3, "the bf16 reference must learn for the comparison to mean anything"
    assert first - last > 0.3
    assert last == pytest.approx(ref_last, abs=MARGIN)


def _check_recorded_codecs(run_dir, codec):
    """The run records the codec of every frozen tensor: projections and experts in it, norms/router in bf16."""
    import json

    record = json.loads((run_dir / "placement.json").read_text())
    codecs = record["tensor_codecs"]
    assert record["codec"] == codec and record["streamed_layers"] == [0, 1, 2, 3]
    assert codecs["layers.0.self_attn.q_proj.base_layer.weight"] == codec
    assert codecs["layers.3.experts.down_proj"] == codec
    assert codecs["layers.0.input_layernorm.weight"] == "bf16"
    assert codecs["layers.0.router.proj.weight"] == "bf16"
    assert json.loads((run_dir / "adapter" / "streamtune.json").read_text())["codec"] == codec
