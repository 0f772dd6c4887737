"""The training recipe: setup -> loop -> teardown.

Setup checks everything cheap first (run directory, devices, tensorboard), then builds the
tokenizer, the data (which validates the dataset), the model, LoRA, and places the model with
:func:`streamtune.offload.place`. The loop runs ``train.max_steps`` optimizer steps of
``train.grad_accum`` micro-batches each.

Loss normalisation: the loss of a step is the sum of the token cross-entropies of all its
micro-batches divided by the step's total number of loss tokens (labels != -100), so every loss
token weighs the same whatever the accumulation split or padding; ``metrics.jsonl`` logs this value.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamtune.errors import InputError, StreamtuneError
from streamtune.hostmem import rss_bytes
from streamtune.train import checkpoint as ckpt
from streamtune.train import outputs
from streamtune.train.loss import count_valid_tokens, lm_loss_sum
from streamtune.train.metrics import MetricsLogger, check_loggers, truncate_metrics
from streamtune.train.rundir import check_run_dir, init_run_dir

BASE_DIR = "base"
ADAPTER_DIR = "adapter"
PLACEMENT_FILE = "placement.json"
MAX_SAVED_BASE_BYTES = 2 * 2**30


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


def resolve_device(name: str) -> Any:
    """``train.device`` as a torch device.

    Raises:
        InputError: cuda asked for but not available.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device: cuda asked for, but torch sees no CUDA device; use train.device=cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: Any) -> Any:
    """``model.dtype`` as a torch dtype: auto = bfloat16 on cuda, float32 on cpu."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def train(cfg: Any, resume: bool = False) -> TrainResult:
    """Run (or resume) the LoRA fine-tune described by ``cfg`` (a RunConfig).

    Raises:
        InputError: bad input found during setup (exit code 2).
        StreamtuneError: runtime failure such as running out of GPU memory (exit code 1).
    """
    recipe = Recipe(cfg, resume)
    recipe.setup()
    try:
        return recipe.loop()
    finally:
        recipe.teardown()


class Recipe:
    """One training run; see the module docstring for the order of things."""

    def __init__(self, cfg: Any, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.logger: MetricsLogger | None = None
        self.placement: Any = None
        self.start_step = 0

    def setup(self) -> None:
        """Check inputs, build data, model, LoRA, placement, optimizer; restore a checkpoint."""
        cfg = self.cfg
        check_loggers(cfg.output)
        self.run_dir = check_run_dir(cfg, self.resume)
        checkpoint_path = ckpt.latest_checkpoint(self.run_dir) if self.resume else None
        self.device = resolve_device(cfg.train.device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        self._build_data()
        self._plan()
        self._build_model()
        init_run_dir(self.run_dir, cfg, self.resume)
        self._save_base()
        self._attach_and_place()
        if checkpoint_path is not None:
            self._restore(checkpoint_path)
        else:
            import torch

            torch.manual_seed(cfg.train.seed)
            random.seed(cfg.train.seed)
        self.logger = MetricsLogger(self.run_dir, cfg.train.max_steps, self.start_step,
                                    cfg.output.tensorboard, cfg.output.progress, wandb_project=cfg.output.wandb,
                                    run_config=cfg.to_dict())

    def _build_data(self) -> None:
        from streamtune.data import build_data, load_tokenizer
        from streamtune.models.build import resolve_config

        resolve_config(self.cfg.model.name, self.cfg.model.trust_remote_code)
        _check_cache_dir(self.cfg)
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.train_loader, self.eval_loader, self.data_stats = build_data(
            self.cfg.data, self.tokenizer, self.cfg.train.batch_size, self.cfg.train.seed)

    def _plan(self) -> None:
        """On a GPU: refuse a run that would not fit, before loading weights; cap the allocator."""
        self.plan = None
        if self.device.type != "cuda":
            return
        import psutil
        import torch

        from streamtune.config import parse_bytes
        from streamtune.plan import plan_for_run, resolve_link_profile

        free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
        self.plan = plan_for_run(self.cfg, link=resolve_link_profile(), gpu_budget_bytes=free_bytes,
                                 host_budget_bytes=psutil.virtual_memory().available)
        self.plan.check()
        if self.cfg.memory.gpu_budget:
            budget = parse_bytes(self.cfg.memory.gpu_budget)
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total_bytes), self.device)

    def _build_model(self) -> None:
        from streamtune.models import is_preset
        from streamtune.models.build import build_model

        m = self.cfg.model
        self.checkpoint = None
        self.load_stats = None
        if is_preset(m.name):
            self.model, self.arch = build_model(m.name, self.dtype, m.seed, m.trust_remote_code)
        else:
            # Decoder layers stay on disk until the engine packs them (one copy in host RAM).
            from streamtune.loading import open_checkpoint

            self.checkpoint = open_checkpoint(m.name, self.dtype, m.trust_remote_code, progress=self.cfg.output.progress)
            self.model, self.arch = self.checkpoint.model, self.checkpoint.adapter
        _check_vocab(self.model, self.tokenizer)

    def _save_base(self) -> None:
        from streamtune.models import is_preset

        m = self.cfg.model
        self.base_info = {
            "model_name": m.name if is_preset(m.name) else str(Path(m.name).expanduser().resolve()),
            "preset": is_preset(m.name), "seed": m.seed, "dtype": str(self.dtype).removeprefix("torch."),
            "trust_remote_code": m.trust_remote_code, "base_dir": None, "codec": self.cfg.memory.codec,
        }
        size_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if not is_preset(m.name) or size_bytes > MAX_SAVED_BASE_BYTES:
            return
        self.base_info["base_dir"] = BASE_DIR
        base_dir = self.run_dir / BASE_DIR
        if not (base_dir / "config.json").is_file():
            self.model.save_pretrained(str(base_dir))
            self.tokenizer.save_pretrained(str(base_dir))

    def _attach_and_place(self) -> None:
        import torch

        from streamtune.lora import attach_lora
        from streamtune.offload import place

        self.model = attach_lora(self.model, self.arch, self.cfg.lora, self.cfg.train.seed)
        load_tensor = self.checkpoint.load_tensor if self.checkpoint is not None else None
        self.pack_cache = self._pack_cache()
        try:
            self.placement = place(self.model, self.arch, self.cfg.memory, self.device, plan=self.plan,
                                   load_tensor=load_tensor, pack_cache=self.pack_cache)
        finally:
            if self.checkpoint is not None:
                self.load_stats = self.checkpoint.finish()
        _report_loading(self.load_stats, self.pack_cache)
        self._record_placement()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        t = self.cfg.train
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        from streamtune.train.schedule import build_scheduler

        self.scheduler = build_scheduler(self.optimizer, t)

    def _record_placement(self) -> None:
        """``RUN/placement.json``: where each layer lives and which codec stores each frozen tensor."""
        import json

        from streamtune.files import atomic_write_bytes

        record = {**self.placement.describe(), "device": str(self.device),
                  "tensor_codecs": self.placement.engine.tensor_codecs(), "loading": self.load_stats,
                  "pack_cache": self.pack_cache.stats() if self.pack_cache is not None else None}
        atomic_write_bytes(self.run_dir / PLACEMENT_FILE, json.dumps(record, indent=1).encode())

    def _pack_cache(self) -> Any:
        if not self.cfg.memory.cache_dir or self.checkpoint is None:
            return None
        from streamtune.loading.cache import PackCache

        return PackCache.for_checkpoint(self.cfg.memory.cache_dir, self.cfg.model.name, self.cfg.memory.codec,
                                        self.dtype, on_hit=self.checkpoint.reader.skip_layer)

    def _restore(self, path: Path) -> None:
        from streamtune.lora import load_trainable_state

        state = ckpt.load_checkpoint(path)
        load_trainable_state(self.model, state.trainable)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if state.loader is not None:
            self.train_loader.load_state_dict(state.loader)
        ckpt.restore_rng(state.rng)
        ckpt.remove_partial(self.run_dir)
        truncate_metrics(self.run_dir, state.step)
        self.start_step = state.step
        if self.start_step >= self.cfg.train.max_steps:
            raise InputError(
                f"--resume: the run already finished {self.start_step} steps; raise train.max_steps "
                f"(now {self.cfg.train.max_steps}) to train further"
            )

    def loop(self) -> TrainResult:
        """Train from ``start_step`` to ``train.max_steps``; checkpoint, evaluate, save the adapter.

        Raises:
            StreamtuneError: out of GPU memory, or the loss became NaN/inf.
        """
        t = self.cfg.train
        result = TrainResult(self.run_dir, self.run_dir / ADAPTER_DIR, self.start_step, t.max_steps)
        started = time.perf_counter()
        batches = iter(self.train_loader)
        for step in range(self.start_step + 1, t.max_steps + 1):
            record = self._train_step(step, batches)
            if self.eval_loader is not None and _due(step, t.eval_every, t.max_steps, at_end=True):
                record["eval_loss"] = self.evaluate()
                result.eval_losses.append(record["eval_loss"])
            result.losses.append(record["loss"])
            self.logger.log(record)
            if _due(step, t.save_every, t.max_steps, at_end=True):
                self.save_checkpoint(step)
            self.on_step_end(step)
        self.save_adapter()
        result.wall_s = time.perf_counter() - started
        result.model = self.model
        return result

    def on_step_end(self, step: int) -> None:
        """Called after each step is logged and checkpointed (a hook for tests and tools)."""

    def _train_step(self, step: int, batches: Any) -> dict[str, Any]:
        import torch

        t = self.cfg.train
        self.model.train()
        _reset_peak(self.device)
        started = time.perf_counter()
        micro = [next(batches) for _ in range(t.grad_accum)]
        loss_tokens = sum(count_valid_tokens(b["labels"]) for b in micro)
        tokens = sum(_num_tokens(b) for b in micro)
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum = 0.0
        try:
            for batch in micro:
                batch = _to_device(batch, self.device)
                part = lm_loss_sum(self.model, self.arch, batch, t.loss_chunk_tokens)
                (part / max(1, loss_tokens)).backward()
                # stays on the device: a host sync per micro-batch would stall the copy pipeline
                loss_sum = loss_sum + part.detach()
        except torch.OutOfMemoryError as exc:
            raise StreamtuneError(
                f"out of GPU memory at step {step}: lower data.seq_len, train.batch_size or "
                f"memory.gpu_budget, or stream more layers (memory.stream=all): {exc}"
            ) from exc
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(loss_sum) / max(1, loss_tokens)
        if not math.isfinite(loss):
            raise StreamtuneError(f"loss is {loss} at step {step}; lower train.lr or check the data")
        _sync(self.device)
        step_s = time.perf_counter() - started
        return {
            "step": step, "loss": loss, "lr": lr, "tokens": tokens, "loss_tokens": loss_tokens,
            "step_s": step_s, "tok_s": tokens / step_s if step_s > 0 else 0.0, "grad_norm": grad_norm,
            "gpu_peak_bytes": _gpu_peak(self.device), "host_rss_bytes": rss_bytes(),
            **self.placement.step_metrics(),
        }

    def evaluate(self) -> float:
        """Mean token loss over the first ``train.eval_batches`` batches of the eval data."""
        import torch

        self.model.eval()
        loss_sum, loss_tokens = 0.0, 0
        with torch.no_grad():
            for index, batch in enumerate(self.eval_loader):
                if index >= self.cfg.train.eval_batches:
                    break
                batch = _to_device(batch, self.device)
                loss_sum += float(lm_loss_sum(self.model, self.arch, batch, self.cfg.train.loss_chunk_tokens))
                loss_tokens += count_valid_tokens(batch["labels"])
        self.model.train()
        return loss_sum / max(1, loss_tokens)

    def save_checkpoint(self, step: int) -> Path:
        """Write ``RUN/checkpoints/step-N`` (atomically)."""
        from streamtune.lora import trainable_state

        loader_state = self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None
        state = ckpt.TrainState(
            step=step, trainable=trainable_state(self.model), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), loader=loader_state, rng=ckpt.capture_rng(),
            extra={"data_stats": _plain(self.data_stats)},
        )
        path = ckpt.save_checkpoint(self.run_dir, state, outputs.checkpoint_writer(
            self.model, self.run_dir, self.cfg, self.base_info, step))
        outputs.after_checkpoint(self.run_dir, step, self.cfg)
        return path

    def save_adapter(self) -> Path:
        """Write the final adapter to ``RUN/adapter`` (PEFT format, tokenizer, streamtune.json)."""
        from streamtune.lora import save_adapter

        adapter_dir = save_adapter(self.model, self.run_dir / ADAPTER_DIR, self.tokenizer, self.base_info)
        outputs.write_card(adapter_dir, self.run_dir, self.cfg, self.base_info)
        return adapter_dir

    def teardown(self) -> None:
        """Close the metrics writers and release the placement."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if self.placement is not None:
            self.placement.close()
            self.placement = None


def _due(step: int, every: int, max_steps: int, at_end: bool) -> bool:
    return (every > 0 and step % every == 0) or (at_end and step == max_steps)


def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if hasattr(v, "to")}


def _num_tokens(batch: dict[str, Any]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _check_cache_dir(cfg: Any) -> None:
    from streamtune.loading.cache import check_cache_root
    from streamtune.models import is_preset

    if not cfg.memory.cache_dir:
        return
    if is_preset(cfg.model.name):
        raise InputError(f"memory.cache_dir caches layers read from a checkpoint directory, but model.name is the "
                         f"preset {cfg.model.name!r} (built in memory, nothing to cache): remove memory.cache_dir")
    check_cache_root(cfg.memory.cache_dir)


def _report_loading(load_stats: dict[str, float] | None, pack_cache: Any) -> None:
    """One stderr line: shard bytes read and their GB/s, pack-cache hits and their GB/s."""
    import sys

    if not load_stats:
        return
    line = f"weights: {load_stats['bytes_read'] / 1e9:.2f} GB read from the shards"
    if load_stats["read_s"] > 0:
        line += f" at {load_stats['gbps']:.2f} GB/s"
    if pack_cache is not None:
        stats = pack_cache.stats()
        line += (f"; pack cache {pack_cache.directory}: {stats['hits']} layer(s) read "
                 f"({stats['bytes_read'] / 1e9:.2f} GB at {stats['read_gbps']:.2f} GB/s), {stats['misses']} encoded and stored")
    print(line, file=sys.stderr)


def _check_vocab(model: Any, tokenizer: Any) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise InputError(
            f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab}; "
            "use the model's own tokenizer"
        )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if hasattr(value, "__dict__"):
        return _plain(vars(value))
    return str(value)


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_peak(device: Any) -> int:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
