"""``enable_activation_checkpointing`` uses the current transformers API and falls back to the old one."""

from __future__ import annotations

import warnings

import torch

from streamtune.models.adapters import decoder_layers, enable_activation_checkpointing
from streamtune.models.build import build_model


def test_checkpoints_every_decoder_layer_without_a_deprecation_warning():
    model, _ = build_model("tiny-llama", torch.float32, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        enable_activation_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))


class _OldTransformersModel:
    def __init__(self):
        self.calls = []

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.calls.append(gradient_checkpointing_kwargs)


def test_falls_back_to_the_old_name_where_the_new_one_is_missing():
    model = _OldTransformersModel()
    enable_activation_checkpointing(model)
    assert model.calls == [{"use_reentrant": False}]
