"""Training gives freed heap back after setup, the first two steps and each between-step collection, and stops
Inductor's compile workers with each trim after the first step (host RAM per rank); it keeps Python's garbage
collection between steps."""

from __future__ import annotations

import streamtune.train.recipe as recipe
from streamtune.config import from_dict
from streamtune.train import train
from tests.conftest import small_run_dict
from tests.infer.runs import train_tiny_run


def test_training_settles_the_heap_after_setup_the_first_steps_and_each_collection(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "settle_heap", lambda: calls.append("settle"))
    monkeypatch.setattr(recipe, "release_free_heap", lambda: calls.append("trim"))
    monkeypatch.setattr(recipe, "stop_compile_workers", lambda: calls.append("stop"))
    monkeypatch.setattr(recipe, "drop_compile_records", lambda: calls.append("drop"))
    monkeypatch.setattr(recipe.Recipe, "on_step_end", lambda self, step: calls.append(step))
    train_tiny_run(tmp_path, max_steps=6, save_every=0, eval_every=0, gc_every_steps=2)
    # setup; step 1 (collect, freeze, settle); step 2 (the second step, and a collection); step 4 and 6
    # (a trim also drops torch.compile's in-memory artifact records first and stops Inductor's compile workers)
    assert calls == ["settle", 1, "settle", 2, "drop", "trim", "stop", 3, 4, "drop", "trim", "stop", 5, 6, "drop",
                     "trim", "stop"]


def test_training_collects_between_steps_and_restores_the_collector(tmp_path, monkeypatch):
    import gc

    seen = []
    real_after_step = recipe.StepCollector.after_step

    def spy(self, step):
        real_after_step(self, step)
        seen.append((step, self.active, gc.isenabled(), gc.get_freeze_count() > 0))

    monkeypatch.setattr(recipe.StepCollector, "after_step", spy)
    enabled = gc.isenabled()
    train_tiny_run(tmp_path, max_steps=3, save_every=0, eval_every=0, gc_every_steps=2)
    assert seen == [(1, True, False, True), (2, True, False, True), (3, True, False, True)]
    assert gc.isenabled() == enabled and gc.get_freeze_count() == 0


def test_a_training_step_leaves_no_tensor_to_the_cycle_collector(tmp_path, monkeypatch):
    """train.gc_every_steps defers collection by up to N steps: safe only while the cyclic garbage a step leaves
    holds no tensors (a GPU tensor in a cycle would stay allocated until the next collection)."""
    import gc

    import torch

    found = []

    def inspect(self, step):
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found.append(sum(isinstance(o, torch.Tensor) for o in gc.garbage))
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()  # now free what was saved

    monkeypatch.setattr(recipe.Recipe, "on_step_end", inspect)
    raw = small_run_dict(tmp_path / "run", data={"seq_len": 128}, memory={"stream": "all", "codec": "int8"},
                         train={"max_steps": 4, "save_every": 0, "gc_every_steps": 100})
    train(from_dict(raw))
    assert found[1:-1] == [0, 0], found  # the first step builds, the last one saves: the steps between


def test_the_model_is_put_in_training_mode_only_when_it_is_not(tmp_path, monkeypatch):
    """``Module.train()`` walks every module (2834 in the 26B preset with LoRA): only when the model is not in
    training mode (after an evaluation), not at every step."""
    import torch

    modes = []
    real_train = torch.nn.Module.train

    def spy(self, mode=True):
        if type(self).__name__.startswith("PeftModel"):  # the top of the trained model
            modes.append(mode)
        return real_train(self, mode)

    monkeypatch.setattr(torch.nn.Module, "train", spy)
    run = train_tiny_run(tmp_path, max_steps=4, save_every=0, eval_every=2)
    assert (run / "adapter").is_dir()
    # eval() is train(False): each of the two evaluations goes to eval and back; the steps add no call
    assert modes == [False, True] * 2, modes


def test_compiled_layers_build_their_graphs_once_and_the_settle_makes_no_step_compile_again(tmp_path, monkeypatch):
    """After step 2 training stops Inductor's compile workers and drops torch.compile's artifact records (and
    again after each collection): the compiled layers must go on running the graphs built by the first step, not
    compile again (a recompile in every later step would cost seconds per step on the GPU)."""
    import torch._dynamo.utils as dynamo_utils

    compiled = []

    def count(self, step):
        stats = dynamo_utils.counters["stats"]
        compiled.append((stats["unique_graphs"], sum(dynamo_utils.counters["recompiles"].values())))

    monkeypatch.setattr(recipe.Recipe, "on_step_end", count)
    raw = small_run_dict(tmp_path / "run", train={"max_steps": 6, "save_every": 0, "gc_every_steps": 2,
                                                  "kernels": "auto", "compile_layers": True})
    train(from_dict(raw))
    assert len(compiled) == 6
    assert all(seen == compiled[0] for seen in compiled[1:]), compiled
