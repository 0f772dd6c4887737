"""tests/conftest.py: pytest-xdist workers are spread over the GPUs, one each, without starting CUDA."""

from __future__ import annotations

from tests.conftest import gpu_of_worker, visible_gpus


def test_workers_take_the_visible_gpus_round_robin():
    gpus = visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"})
    assert gpus == ["2", "5"]
    assert [gpu_of_worker(f"gw{i}", gpus) for i in range(3)] == ["2", "5", "2"]
    assert gpu_of_worker("master", gpus) is None and gpu_of_worker("", gpus) is None
    assert gpu_of_worker("gw3", ["0"]) is None  # one GPU: nothing to spread


def test_gpus_are_counted_from_device_files_when_the_variable_is_unset(tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidia10", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert visible_gpus({}, tmp_path) == ["0", "1", "10"]
    assert visible_gpus({}, tmp_path / "missing") == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
