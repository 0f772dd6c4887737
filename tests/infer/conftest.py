"""One tiny trained run per test module (training costs seconds on two cores)."""

from __future__ import annotations

import pytest

from tests.infer.runs import train_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The run directory of a 2-step tiny-gemma4 run (checkpoints step-1, step-2; adapter/)."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny_run"))
