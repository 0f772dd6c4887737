"""The training recipe: setup -> loop -> teardown.

Setup checks everything cheap first (run directory, devices, tensorboard), then builds the
tokenizer, the data (which validates the dataset), the model, LoRA, and places the model with
:func:`streamtune.offload.place`. The loop runs ``train.max_steps`` optimizer steps of
``train.grad_accum`` micro-batches each.

Loss normalisation: the loss of a step is the sum of the token cross-entropies of all its
micro-batches divided by the step's total number of loss tokens (labels != -100), so every loss
token weighs the same whatever the accumulation split or padding; ``metrics.jsonl`` logs this value.
Under torchrun the step is the global one (``streamtune.distributed.data_parallel``): counts and
gradients are summed over ranks, and only rank 0 writes metrics, checkpoints and the adapter.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamtune.devices import resolve_device, resolve_dtype
from streamtune.distributed.overlap import make_grad_reduce
from streamtune.errors import InputError, StreamtuneError
from streamtune.hostmem import (drop_compile_records, peak_rss_bytes, release_free_heap, rss_bytes, settle_heap,
                                stop_compile_workers)
from streamtune.stepgc import StepCollector
from streamtune.train import checkpoint as ckpt
from streamtune.train import outputs
from streamtune.train.guard import StepStart, StopSignals, non_finite_error, stopped_error
from streamtune.train.loss import batch_loss_tokens, count_valid_tokens, lm_loss_sum
from streamtune.train.metrics import MetricsLogger, check_loggers, truncate_metrics
from streamtune.train.rundir import check_run_dir, init_run_dir
from streamtune.train.support import (
    check_cache_dir, check_vocab, due, gpu_peak, note, num_tokens, plain, report_loading, reset_peak, sync, to_device,
)

ADAPTER_DIR = "adapter"


@dataclass
class TrainResult:
    """What a finished run returns (the CLI prints a summary of it)."""

    run_dir: Path
    adapter_dir: Path
    start_step: int
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    model: Any = None


def train(cfg: Any, resume: bool = False, resume_command: str | None = None, keep_model: bool = True) -> TrainResult:
    """Run (or resume) the LoRA fine-tune described by ``cfg`` (a RunConfig).

    Args:
        cfg: the run's ``RunConfig``.
        resume: continue the run in ``output.dir`` from its latest checkpoint.
        resume_command: the command that resumes this run, quoted in the messages of a stopped run.
        keep_model: decode the trained model back into ordinary CPU tensors for ``TrainResult.model``
            (the whole bf16 base in host RAM); False discards the placement instead and leaves ``model`` None
            (``streamtune train`` exits after writing the adapter).

    Raises:
        InputError: bad input found during setup (exit code 2).
        RunStopped: SIGINT/SIGTERM stopped the run after writing a checkpoint (exit code 130/143).
        StreamtuneError: runtime failure such as running out of GPU memory, or a non-finite loss or
            gradient (exit code 1; the last good state is checkpointed).
    """
    recipe = Recipe(cfg, resume, resume_command)
    recipe.setup()
    try:
        result = recipe.loop()
        if not keep_model:
            result.model = None
        return result
    finally:
        recipe.teardown(keep_model)


class Recipe:
    """One training run; see the module docstring for the order of things."""

    def __init__(self, cfg: Any, resume: bool = False, resume_command: str | None = None):
        self.cfg = cfg
        self.resume = resume
        self.resume_command = resume_command or "streamtune train CONFIG --resume"
        self.logger: MetricsLogger | None = None
        self.placement: Any = None
        self.signals: StopSignals | None = None
        self.collector = StepCollector(0)
        self.start_step = 0
        self.dist: Any = None
        self.last_saved_step: int | None = None

    def setup(self) -> None:
        """Check inputs, build data, model, LoRA, placement, optimizer; restore a checkpoint."""
        cfg = self.cfg
        check_loggers(cfg.output)
        self.run_dir = check_run_dir(cfg, self.resume)
        checkpoint_path = ckpt.latest_checkpoint(self.run_dir) if self.resume else None
        self.device = self._init_distributed()
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        self._build_data()
        self._plan()
        self._build_model()
        if self.dist.is_main:
            init_run_dir(self.run_dir, cfg, self.resume)
        self._save_base()
        self._attach_and_place()
        if checkpoint_path is not None:
            self._restore(checkpoint_path)
        else:
            import torch

            torch.manual_seed(cfg.train.seed)
            random.seed(cfg.train.seed)
        self.dist.broadcast_params(self.params)
        if self.dist.is_main:
            from streamtune.train.summary import print_summary

            print_summary(cfg, self.data_stats, self.model, self.placement, self.plan, self.start_step,
                          kernels=self.kernels, kernels_applied=self.kernels_applied, world_size=self.dist.world_size)
        self.logger = self.dist.logger(lambda: MetricsLogger(
            self.run_dir, cfg.train.max_steps, self.start_step, cfg.output.tensorboard, cfg.output.progress,
            wandb_project=cfg.output.wandb, run_config=cfg.to_dict()))

    def _init_distributed(self) -> Any:
        """Join the torchrun job when launched by one (see ``streamtune.distributed``); the compute device."""
        from streamtune.distributed import init_from_env

        from streamtune.train.split import split_devices

        self.devices = split_devices(self.cfg)  # a layer split: one process, several devices; [] otherwise
        self.dist, device = init_from_env(self.cfg.train.device, self.cfg.train.dist_backend)
        self.dist.check_train_config(self.cfg.train)
        if self.devices:
            return self.devices[0]
        return device if device is not None else resolve_device(self.cfg.train.device)

    def _build_data(self) -> None:
        from streamtune.data import build_data, load_tokenizer
        from streamtune.lora.targets import check_lora_targets_of_config
        from streamtune.models.build import resolve_config

        config = resolve_config(self.cfg.model.name, self.cfg.model.trust_remote_code)
        check_lora_targets_of_config(config, self.cfg.lora)
        check_cache_dir(self.cfg)
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.train_loader, self.eval_loader, self.data_stats = build_data(
            self.cfg.data, self.tokenizer, self.cfg.train.batch_size, self.cfg.train.seed)

    def _plan(self) -> None:
        """On a GPU: refuse a run that would not fit, before loading weights; cap the allocator."""
        from streamtune.devices import plan_on_device

        self.plan = self.split_plan = None
        if self.devices:
            from streamtune.train.split import plan_split_on_devices

            if self.device.type == "cuda":
                self.split_plan = plan_split_on_devices(self.cfg, self.devices)
        elif self.device.type == "cuda":
            self.plan = plan_on_device(self.cfg, self.device, self.dist.host_copies_shared_by())

    def _build_model(self) -> None:
        from streamtune.loading import open_base

        # decoder layers stay on disk (or unfilled, for a preset) until the engine packs them: one copy in host RAM
        self.base = open_base(self.cfg.model, self.dtype, progress=self.cfg.output.progress)
        self.model, self.arch = self.base.model, self.base.adapter
        self.load_stats = None
        check_vocab(self.model, self.tokenizer)

    def _save_base(self) -> None:
        self.base_info = outputs.save_base(self.cfg.model, self.cfg.memory.codec, self.dtype, self.base,
                                           self.tokenizer, self.run_dir, self.dist.is_main)

    def _attach_and_place(self) -> None:
        import torch

        from streamtune.lora import attach_lora
        from streamtune.offload import place

        self.model = attach_lora(self.model, self.arch, self.cfg.lora, self.cfg.train.seed)
        self._apply_kernels()
        host_store = self.dist.shared_host_store(self.base.skip_layer)
        self.pack_cache = self._pack_cache() if host_store is None or host_store.owner else None
        try:
            if self.devices:
                from streamtune.train.split import place_layer_split

                self.placement = place_layer_split(self.model, self.cfg, self.devices, self.split_plan,
                                                   load_tensor=self.base.load_tensor, pack_cache=self.pack_cache)
            else:
                self.placement = place(self.model, self.arch, self.cfg.memory, self.device, plan=self.plan,
                                       load_tensor=self.base.load_tensor, pack_cache=self.pack_cache,
                                       host_store=host_store)
        finally:
            self.load_stats = self.base.finish()
        self.dist.release_shared_host(host_store)
        settle_heap()  # loading's transient copies
        self.shared_host = host_store.stats() if host_store is not None else None
        report_loading(self.load_stats, self.pack_cache)
        if self.dist.is_main:
            self._record_placement()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        t = self.cfg.train
        self.grad_reduce = make_grad_reduce(self.dist, self.params, t.overlap_grad_reduce)
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        from streamtune.train.schedule import build_scheduler

        self.scheduler = build_scheduler(self.optimizer, t)

    def _apply_kernels(self) -> None:
        """``train.kernels``: pick the fast pieces for this device and patch the model with them."""
        from streamtune.kernels import apply_kernels, select_for_device

        self.kernels = select_for_device(self.cfg.train.kernels, self.device, self.dtype,
                                         self.cfg.train.compile_layers)
        self.kernels_applied = apply_kernels(self.model, self.kernels)

    def _record_placement(self) -> None:
        outputs.write_placement(self.run_dir, self.placement, self.device, self.kernels, self.kernels_applied,
                                loading=self.load_stats, pack_cache=self.pack_cache, world_size=self.dist.world_size,
                                dist_backend=self.dist.backend or None, gradient_sum=self.dist.gradient_sum_path(),
                                shared_host=self.shared_host)

    def _pack_cache(self) -> Any:
        if not self.cfg.memory.cache_dir:  # check_cache_dir refused it for a preset before anything loaded
            return None
        from streamtune.loading.cache import PackCache

        return PackCache.for_checkpoint(self.cfg.memory.cache_dir, self.cfg.model.name, self.cfg.memory.codec,
                                        self.dtype, on_hit=self.base.skip_layer)

    def _restore(self, path: Path) -> None:
        from streamtune.lora import load_trainable_state

        state = ckpt.load_checkpoint(path)
        load_trainable_state(self.model, state.trainable)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        from streamtune.distributed.data_parallel import check_resume_batch

        check_resume_batch(state.extra, self.cfg.train.batch_size, self.cfg.train.grad_accum, self.dist.world_size)
        if state.loader is not None:
            self.train_loader.load_state_dict(state.loader)
        ckpt.restore_rng(state.rng)
        if self.dist.is_main:
            ckpt.remove_partial(self.run_dir)
            truncate_metrics(self.run_dir, state.step)
        self.start_step = self.last_saved_step = state.step
        if self.start_step >= self.cfg.train.max_steps:
            raise InputError(
                f"--resume: the run already finished {self.start_step} steps; raise train.max_steps "
                f"(now {self.cfg.train.max_steps}) to train further"
            )
        from streamtune.train.schedule import rebase_on_resume

        note(rebase_on_resume(self.scheduler, self.optimizer, self.cfg.train, self.start_step))

    def loop(self) -> TrainResult:
        """Train from ``start_step`` to ``train.max_steps``; checkpoint, evaluate, save the adapter.

        Raises:
            StreamtuneError: out of GPU memory, or the loss or gradient became NaN/inf (the last good
                state is checkpointed first).
            RunStopped: SIGINT or SIGTERM (a checkpoint of the run so far is written first).
        """
        t = self.cfg.train
        result = TrainResult(self.run_dir, self.run_dir / ADAPTER_DIR, self.start_step, t.max_steps)
        started = time.perf_counter()
        batches = iter(self.train_loader)
        self.signals = StopSignals().install()
        self.collector = StepCollector(t.gc_every_steps)
        try:
            self._steps(result, batches)
        finally:
            self.collector.close()
        self.save_adapter()
        result.wall_s = time.perf_counter() - started
        result.model = self.model
        return result

    def _steps(self, result: TrainResult, batches: Any) -> None:
        """The optimizer steps of :meth:`loop`, each logged, evaluated and checkpointed when due."""
        t = self.cfg.train
        for step in range(self.start_step + 1, t.max_steps + 1):
            start = self._step_start()
            record = self._train_step(step, batches, start)
            if record is None:
                self._stop(step, start)
            if self.eval_loader is not None and due(step, t.eval_every, t.max_steps, at_end=True):
                record["eval_loss"] = self.evaluate()
                result.eval_losses.append(record["eval_loss"])
            result.losses.append(record["loss"])
            self.logger.log(record)
            if due(step, t.save_every, t.max_steps, at_end=True):
                self.save_checkpoint(step)
            self.on_step_end(step)
            collected = self.collector.after_step(step)  # the first call collects and freezes the compile garbage
            if step == self.start_step + 1:
                settle_heap()  # then the freed heap goes back to the OS (host RAM per rank)
            elif collected or step == self.start_step + 2:
                # the second step's and each collection's freed heap too: a CPU run of the 26B preset cut to
                # 2 layers held 0.59 GB of heap after its second step, 0.19 GB after this trim
                drop_compile_records()  # the in-memory copies of compile artifacts, kept only for export
                release_free_heap()
                stop_compile_workers()  # the warm-up steps have compiled: the worker processes only hold RAM
            if step < t.max_steps and self._stop_requested():
                self._stop(step)

    def _stop_requested(self) -> bool:
        """A stop signal reached this rank, or (under torchrun) any rank: all ranks stop after the same step."""
        received = self.signals.received is not None
        if not self.dist.active:
            return received
        if self.dist.sum_numbers([float(received)], "cpu", "stop-signal all-reduce")[0] > 0 and not received:
            import signal

            self.signals.received = signal.SIGTERM  # another rank was signalled
        return self.signals.received is not None

    def on_step_end(self, step: int) -> None:
        """Called after each step is logged and checkpointed (a hook for tests and tools)."""

    def _step_start(self) -> StepStart:
        return StepStart(self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None,
                         ckpt.capture_rng())

    def _train_step(self, step: int, batches: Any, start: StepStart) -> dict[str, Any] | None:
        """One optimizer step; None when a stop signal came before its last micro-batch (abandoned)."""
        import torch

        t = self.cfg.train
        if not self.model.training:  # Module.train() walks every module: 2834 in the 26B preset with LoRA, 9 ms
            self.model.train()
        for device in self.devices or [self.device]:
            reset_peak(device)
        started = time.perf_counter()
        micro = self.dist.step_batches(batches, t.grad_accum)
        loss_tokens, tokens = (int(n) for n in self.dist.sum_numbers(
            [sum(count_valid_tokens(b["labels"]) for b in micro), sum(num_tokens(b) for b in micro)], "cpu",
            "token count all-reduce"))
        lr = self.optimizer.param_groups[0]["lr"]
        parts = self._accumulate(step, micro, loss_tokens)
        if parts is None:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.grad_reduce:
            self.grad_reduce.finish()  # the buckets the last backward started, then the rest
        else:
            self.dist.all_reduce_grads(self.params)
        loss_sum = self.dist.sum_numbers([sum(parts)], self.device, "loss all-reduce")[0]
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        loss = float(loss_sum) / max(1, loss_tokens)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._fail_non_finite(step, start, micro, parts, loss, grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for device in self.devices or [self.device]:
            sync(device)
        step_s = time.perf_counter() - started
        split = {"gpu_peak_bytes_per_device": [gpu_peak(d) for d in self.devices]} if self.devices else {}
        return {**split,
            "step": step, "loss": loss, "lr": lr, "tokens": tokens, "loss_tokens": loss_tokens,
            "step_s": step_s, "tok_s": tokens / step_s if step_s > 0 else 0.0, "grad_norm": grad_norm,
            "gpu_peak_bytes": gpu_peak(self.device), "host_rss_bytes": rss_bytes(),
            "host_peak_rss_bytes": peak_rss_bytes(),
            **self.placement.step_metrics(),
        }

    def _accumulate(self, step: int, micro: list[dict[str, Any]], loss_tokens: int) -> list[Any] | None:
        """Forward and backward of every micro-batch; their summed token losses, kept on the device
        (a host sync per micro-batch would stall the copy pipeline). None: stopped by a signal."""
        import torch

        parts = []
        try:
            for index, batch in enumerate(micro):
                # a single process may abandon the step; ranks finish it together (their collectives must match)
                if not self.dist.active and self.signals is not None and self.signals.received is not None:
                    return None
                batch = to_device(batch, self.device)
                part = lm_loss_sum(self.model, self.arch, batch, self.cfg.train.loss_chunk_tokens, self.kernels)
                if self.grad_reduce and index == len(micro) - 1:
                    self.grad_reduce.arm()  # the last backward starts each bucket's all-reduce when it is complete
                (part / max(1, loss_tokens)).backward()
                parts.append(part.detach())
        except torch.OutOfMemoryError as exc:
            raise StreamtuneError(
                f"out of GPU memory at step {step}: lower data.seq_len, train.batch_size or "
                f"memory.gpu_budget, or stream more layers (memory.stream=all): {exc}"
            ) from exc
        return parts

    def _fail_non_finite(self, step: int, start: StepStart, micro: list[dict[str, Any]], parts: list[Any],
                         loss: float, grad_norm: float) -> None:
        """Checkpoint the state before ``step`` and raise an error naming the step's samples."""
        path = self._save_once(step - 1, start)
        raise non_finite_error(step, loss, grad_norm, micro, parts, self.train_loader, path, self.resume_command)

    def _stop(self, step: int, start: StepStart | None = None) -> None:
        """Checkpoint after a stop signal and raise :class:`RunStopped`; ``start``: step was abandoned."""
        path = self._save_once(step - 1 if start is not None else step, start)
        raise stopped_error(self.signals, step, start is not None, path, self.resume_command)

    def _save_once(self, step: int, start: StepStart | None) -> Path:
        if self.last_saved_step == step:
            return self.run_dir / ckpt.CHECKPOINTS_DIR / f"step-{step}"
        return self.save_checkpoint(step, start)

    def evaluate(self) -> float:
        """Mean token loss over the first ``train.eval_batches`` batches of the eval data."""
        import torch

        self.model.eval()
        loss_sum, loss_tokens = 0.0, 0
        with torch.no_grad():
            for batch in self.dist.shard(itertools.islice(self.eval_loader, self.cfg.train.eval_batches)):
                batch = to_device(batch, self.device)
                loss_sum += float(lm_loss_sum(self.model, self.arch, batch, self.cfg.train.loss_chunk_tokens,
                                             self.kernels))
                loss_tokens += batch_loss_tokens(batch)
        self.model.train()
        loss_sum, loss_tokens = self.dist.sum_numbers([loss_sum, loss_tokens], "cpu", "eval loss all-reduce")
        return loss_sum / max(1, loss_tokens)

    def save_checkpoint(self, step: int, start: StepStart | None = None) -> Path:
        """Write ``RUN/checkpoints/step-N`` (atomically; rank 0 writes, the others wait).

        Args:
            step: the number of optimizer steps the weights, optimizer and scheduler have taken.
            start: data position and RNGs to record instead of the current ones (those at the start
                of step N + 1, for a step that was not applied).
        """
        path = self.dist.main_writes(self._write_checkpoint, step, start, what=f"checkpoint step-{step}")
        self.last_saved_step = step  # on every rank: _save_once must make the same collective calls everywhere
        return path

    def _write_checkpoint(self, step: int, start: StepStart | None = None) -> Path:
        from streamtune.lora import trainable_state

        start = start or self._step_start()
        state = ckpt.TrainState(
            step=step, trainable=trainable_state(self.model), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), loader=start.loader, rng=start.rng,
            extra={"data_stats": plain(self.data_stats), **self.dist.checkpoint_extra(self.cfg.train)},
        )
        path = ckpt.save_checkpoint(self.run_dir, state, outputs.checkpoint_writer(
            self.model, self.run_dir, self.cfg, self.base_info, step))
        outputs.after_checkpoint(self.run_dir, step, self.cfg)
        return path

    def save_adapter(self) -> Path:
        """Write the final adapter to ``RUN/adapter`` (PEFT format, tokenizer, streamtune.json, model card)."""
        return self.dist.main_writes(self._write_adapter, what="adapter")

    def _write_adapter(self) -> Path:
        from streamtune.lora import save_adapter

        adapter_dir = save_adapter(self.model, self.run_dir / ADAPTER_DIR, self.tokenizer, self.base_info)
        outputs.write_card(adapter_dir, self.run_dir, self.cfg, self.base_info)
        return adapter_dir

    def teardown(self, keep_model: bool = True) -> None:
        """Put the previous signal handlers back, close the metrics writers and close the placement (the model
        decoded back to CPU tensors) or, without ``keep_model``, discard it."""
        if self.signals is not None:
            self.signals.restore()
            self.signals = None
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if self.placement is not None:
            if keep_model:
                self.placement.close()
            else:
                self.placement.discard()
            self.placement = None
        if self.dist is not None:
            self.dist.close()
