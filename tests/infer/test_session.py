"""Leaving an ``open_model`` block discards the placement; ``close()`` decodes the weights back."""

from __future__ import annotations

from streamtune.infer.session import InferenceModel


class _Placement:
    def __init__(self, calls: list[str]):
        self.calls = calls

    def close(self) -> None:
        self.calls.append("close")

    def discard(self) -> None:
        self.calls.append("discard")


def _opened(calls: list[str]) -> InferenceModel:
    return InferenceModel(None, None, None, "cpu", None, None, _Placement(calls))


def test_leaving_the_block_discards_without_decoding():
    calls: list[str] = []
    with _opened(calls):
        pass
    assert calls == ["discard"]


def test_close_decodes_back_once_and_the_block_then_does_nothing():
    calls: list[str] = []
    with _opened(calls) as loaded:
        loaded.close()
    assert calls == ["close"]
