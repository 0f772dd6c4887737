"""The end of a run: the API decodes the model back for ``TrainResult.model``; ``streamtune train`` discards it."""

from __future__ import annotations

import torch

from streamtune.cli import main
from streamtune.config import from_dict
from streamtune.offload import StreamEngine
from streamtune.train import train


def _record_endings(monkeypatch) -> list[str]:
    endings: list[str] = []
    close, discard = StreamEngine.close, StreamEngine.discard

    def recorded_close(self, *args, **kwargs):
        endings.append("close")
        return close(self, *args, **kwargs)

    def recorded_discard(self):
        endings.append("discard")
        return discard(self)

    monkeypatch.setattr(StreamEngine, "close", recorded_close)
    monkeypatch.setattr(StreamEngine, "discard", recorded_discard)
    return endings


def test_api_train_decodes_the_model_back(tmp_path, monkeypatch, run_dict):
    endings = _record_endings(monkeypatch)
    result = train(from_dict(run_dict(tmp_path / "run", train={"max_steps": 1})))
    assert endings == ["close"] and result.model is not None
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in result.model.parameters())


def test_cli_train_discards_the_placement_instead_of_decoding_it(write_config, monkeypatch):
    endings = _record_endings(monkeypatch)
    assert main(["train", str(write_config(memory={"stream": "all"}, train={"max_steps": 1}))]) == 0
    assert endings == ["discard"]


def test_discard_drops_the_packed_layers():
    from streamtune.models.build import build_preset

    model = build_preset("tiny-gemma4", torch.float32)
    engine = StreamEngine(model, "cpu", streamed=[0, 1], codec="int8")
    assert engine.packs and engine.streamed
    engine.discard()
    assert not engine.packs and not engine.streamed and not engine.resident_buffers
