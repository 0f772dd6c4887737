"""Process groups from the torchrun environment, and the collectives the training loop needs.

torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) starts one process per GPU; :func:`init_from_env` joins them: NCCL
when the run trains on CUDA, gloo on the CPU, every rank on ``cuda:LOCAL_RANK`` (``train.dist_backend: gloo``
uses gloo on CUDA too, with GPU tensors reduced through host copies). Without those
variables (or with ``WORLD_SIZE=1``) it returns a single-process context whose collectives do
nothing, so the loop has one code path.

Every collective runs under a timeout (``STREAMTUNE_DIST_TIMEOUT_S``, default 600 s): a rank that
dies or stalls makes the others fail with a :class:`StreamtuneError` naming the operation, instead
of hanging (torchrun then stops the remaining ranks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from streamtune.distributed import local_sum
from streamtune.errors import InputError, StreamtuneError
from streamtune.hostmem import COMPILE_THREADS_ENV, compile_workers_per_process, limit_malloc_arenas

TIMEOUT_ENV = "STREAMTUNE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def timeout_s() -> float:
    """The collective timeout in seconds (``STREAMTUNE_DIST_TIMEOUT_S``, default 600).

    Raises:
        InputError: the variable is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise InputError(f"{TIMEOUT_ENV}={raw!r}: must be a positive number of seconds, e.g. 600")
    return value


@dataclass
class DistContext:
    """Where this process stands in the job, and the collectives over it.

    Attributes:
        rank: global rank (0 writes checkpoints, the adapter, metrics and progress).
        world_size: number of ranks.
        local_rank: rank on this host (its CUDA device index).
        local_world_size: ranks on this host (they share one host copy of the weights).
        backend: ``nccl``, ``gloo`` or ``""`` for a single process. With gloo, GPU tensors are reduced and
            broadcast through host copies (:func:`on_host`).
        timeout_s: collective timeout.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S
    device: Any = None
    staging: HostStaging = field(default_factory=lambda: HostStaging(), repr=False)
    local_sums: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def active(self) -> bool:
        """True when there is more than one rank (collectives do work)."""
        return self.world_size > 1

    def barrier(self, what: str) -> None:
        """Wait until every rank reaches this point (``what`` names it in errors)."""
        if self.active:
            import torch.distributed as dist

            self._guard(what, dist.barrier)

    def all_reduce_sum(self, values: Any, what: str) -> Any:
        """Sum a tensor over ranks, in place; returns it (gloo on one host: through shared memory)."""
        if self.active and local_sum.applies(self, values.is_cuda):
            self._local_sum(values).sum_(values)
        else:
            self._all_reduce(values, what)
        return values

    def _all_reduce(self, values: Any, what: str) -> None:
        """The process group's own sum (gloo: of a host copy of a GPU tensor)."""
        if self.active:
            import torch.distributed as dist

            with on_host(values, self.backend, self.staging) as staged:
                self._guard(what, dist.all_reduce, staged, op=dist.ReduceOp.SUM)

    def all_reduce_sum_async(self, values: Any, what: str) -> Any:
        """Start summing a tensor over ranks, in place; returns the work to pass to :meth:`wait_collective`."""
        import torch.distributed as dist

        if local_sum.applies(self, values.is_cuda):  # done now: the host waits (inside the backward: no overlap)
            self._local_sum(values).sum_(values)
            return _DoneWork()
        if _reduced_on_host(values, self.backend):
            # the host waits for the GPU here (inside the backward with overlap_grad_reduce: no overlap)
            host = self.staging.stage(values)
            work = self._guard(what, dist.all_reduce, host, op=dist.ReduceOp.SUM, async_op=True)
            return HostStagedWork(work, host, values, self.staging)
        return self._guard(what, dist.all_reduce, values, op=dist.ReduceOp.SUM, async_op=True)

    def gradient_sum_path(self) -> str | None:
        """How gradients are summed over the ranks (``placement.json``): ``nccl``, ``gloo``, ``shared memory``
        (gloo on one host, :mod:`~streamtune.distributed.local_sum`), or None for one process."""
        if not self.active:
            return None
        on_cuda = self.device is not None and self.device.type == "cuda"
        return "shared memory" if local_sum.applies(self, on_cuda) else self.backend

    def _local_sum(self, values: Any) -> Any:
        """The shared-memory sum for tensors of ``values``'s dtype, made (a collective) at its first use."""
        if values.dtype not in self.local_sums:
            self.local_sums[values.dtype] = local_sum.LocalSum.create(self, values.dtype, pin=values.is_cuda)
        return self.local_sums[values.dtype]

    def wait_collective(self, work: Any, what: str) -> None:
        """Wait for a started collective (NCCL: the current stream waits, not the host; gloo: the host waits)."""
        self._guard(what, work.wait)

    def sum_numbers(self, numbers: list[float], device: Any, what: str) -> list[float]:
        """Sum a few Python numbers (or 0-d tensors) over ranks in one collective (float64).

        ``device`` is where the numbers live; NCCL reduces on this rank's GPU whatever it is.
        """
        if not self.active:
            return [float(n) for n in numbers]
        import torch

        on = self.device if self.backend == "nccl" else "cpu"
        values = torch.stack([torch.as_tensor(n, dtype=torch.float64, device=device).reshape(()).to(on)
                              for n in numbers])
        self._all_reduce(values, what)  # a few numbers: not worth the shared slots of the gradient sum
        return [float(v) for v in values.cpu()]

    def all_reduce_grads(self, params: list[Any]) -> None:
        """Sum the gradients of ``params`` over ranks: one flattened all-reduce after the backward.

        The loss of each rank is already divided by the GLOBAL number of loss tokens of the step, so
        the sum is the gradient one process would get for the whole global batch (no division by
        the world size). A parameter without a gradient on this rank contributes zeros.
        """
        if not self.active or not params:
            return
        import torch

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        by_dtype: dict[Any, list[int]] = {}
        for index, grad in enumerate(grads):
            by_dtype.setdefault((grad.dtype, grad.device), []).append(index)
        for indices in by_dtype.values():
            flat = torch.cat([grads[i].reshape(-1) for i in indices])
            self.all_reduce_sum(flat, "gradient all-reduce")
            write_grads(params, indices, flat)

    def broadcast_params(self, params: list[Any]) -> None:
        """Make every rank hold rank 0's values of ``params`` (start of training and after resume)."""
        if not self.active:
            return
        import torch.distributed as dist

        for param in params:
            with on_host(param.data, self.backend, self.staging) as staged:
                self._guard("parameter broadcast", dist.broadcast, staged, src=0)

    def broadcast_object(self, value: Any, what: str) -> Any:
        """Rank 0's ``value`` on every rank (small picklable objects)."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        self._guard(what, dist.broadcast_object_list, box, src=0)
        return box[0]

    def all_gather_object(self, value: Any, what: str) -> list[Any]:
        """Every rank's ``value``, in rank order (small picklable objects)."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._guard(what, dist.all_gather_object, out, value)
        return out

    def shared_host_store(self, on_hit: Any = None) -> Any:
        """The store through which local ranks share one packed host copy, or None (one rank per host)."""
        from streamtune.distributed.shared_host import create_store

        return create_store(self, on_hit)

    def release_shared_host(self, store: Any) -> None:
        """After every rank has mapped every layer: unlink the shared files (mappings stay valid)."""
        if store is None:
            return
        self.barrier("waiting for every rank to map the shared host copy")
        store.unlink()

    def host_copies_shared_by(self) -> int:
        """Local ranks that share this rank's host copy of the weights (1 when sharing is off)."""
        from streamtune.distributed.shared_host import sharing_enabled

        return self.local_world_size if sharing_enabled(self) else 1

    def check_train_config(self, train_cfg: Any) -> None:
        """Validate the per-rank micro-batch split before any heavy work.

        Raises:
            InputError: ``STREAMTUNE_RANK_MICRO_BATCHES`` does not fit ``train.grad_accum`` and the world size.
        """
        from streamtune.distributed.data_parallel import rank_micro_batches

        rank_micro_batches(train_cfg.grad_accum, self.world_size)

    def step_batches(self, batches: Any, grad_accum: int) -> list[Any]:
        """This rank's micro-batches of the next global step (``data_parallel.take_step_batches``)."""
        from streamtune.distributed.data_parallel import rank_micro_batches, take_step_batches

        return take_step_batches(batches, grad_accum, self, rank_micro_batches(grad_accum, self.world_size))

    def shard(self, items: Any) -> Any:
        """This rank's share of ``items`` (every ``world_size``-th, from ``rank``)."""
        from streamtune.distributed.data_parallel import shard

        return shard(items, self)

    def main_writes(self, fn: Any, *args: Any, what: str, **kwargs: Any) -> Any:
        """Rank 0 calls ``fn``; every rank then waits for it at a barrier. Returns ``fn``'s result on rank 0."""
        result = fn(*args, **kwargs) if self.is_main else None
        self.barrier(f"waiting for rank 0 to write the {what}")
        return result

    def checkpoint_extra(self, train_cfg: Any) -> dict[str, Any]:
        """What a checkpoint records about the job: the global batch (checked on resume) and world size."""
        from streamtune.distributed.data_parallel import GLOBAL_BATCH_KEY, global_batch_rows

        rows = global_batch_rows(train_cfg.batch_size, train_cfg.grad_accum, self.world_size)
        return {GLOBAL_BATCH_KEY: rows, "world_size": self.world_size}

    def logger(self, factory: Any) -> Any:
        """``factory()`` (the metrics logger) on rank 0, a logger that drops everything elsewhere."""
        from streamtune.distributed.data_parallel import NullLogger

        return factory() if self.is_main else NullLogger()

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as exc:  # gloo/NCCL report peer loss and timeouts as these
            raise StreamtuneError(
                f"rank {self.rank}/{self.world_size}: {what} failed: another rank died or stalled for more than "
                f"{self.timeout_s:.0f} s ({TIMEOUT_ENV}); see the first failing rank's log above. ({exc})"
            ) from exc

    def close(self) -> None:
        """Leave the process group (idempotent)."""
        if not self.active:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class HostStaging:
    """Page-locked host buffers that gloo collectives on GPU tensors run on, reused from step to step.

    Problem: ``values.cpu()`` copies into pageable memory, allocated anew for every collective: for the 74 MB of
    the 26B preset's gradients that is a D2H at 13 GB/s and an H2D at 6 GB/s on the H200 host (about 17 ms
    a step), against about 54 GB/s both ways from page-locked memory.
    Solution: one buffer per tensor in flight, of its exact shape, page-locked once (``alloc_host_buffer``)
    and kept in a free list by shape and dtype (a flat gradient, a few bucket shapes, one per LoRA shape).
    """

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self._free: dict[tuple[Any, Any], list[Any]] = {}
        self._allocated: list[Any] = []  # the buffers as allocated: their page-lock ends when they are collected

    def stage(self, values: Any) -> Any:
        """A host buffer holding ``values`` now (the host waited for the copy)."""
        import torch

        from streamtune.offload.host import alloc_host_buffer

        free = self._free.setdefault((tuple(values.shape), values.dtype), [])
        if free:
            host = free.pop()
        else:
            self._allocated.append(alloc_host_buffer(values.numel() * values.element_size(), self.pin))
            host = self._allocated[-1].view(values.dtype).view(values.shape)
        # the D2H is queued on the current stream after the kernels that wrote ``values``; the host waits for it
        # before a collective reads ``host``. A reused buffer's last H2D (``unstage``) is earlier on that stream.
        host.copy_(values, non_blocking=True)
        if values.is_cuda:
            torch.cuda.current_stream(values.device).synchronize()
        return host

    def unstage(self, host: Any, values: Any) -> None:
        """Write ``host`` (the collective's result) back into ``values`` and keep the buffer for reuse."""
        # queued on the current stream: later kernels read the result; the buffer is written again only by the
        # next ``stage``, whose D2H comes after this copy on the stream and which the host waits for
        values.copy_(host, non_blocking=True)
        self._free[(tuple(host.shape), host.dtype)].append(host)


def _reduced_on_host(values: Any, backend: str) -> bool:
    """Whether a ``backend`` collective on ``values`` runs on a host copy: gloo and a tensor off the CPU."""
    return backend == "gloo" and values.device.type != "cpu"


@contextlib.contextmanager
def on_host(values: Any, backend: str, staging: HostStaging) -> Iterator[Any]:
    """The tensor a ``backend`` collective should run on in place: ``values`` itself, or with gloo and a GPU
    tensor, a host copy (``staging``) that is written back into ``values`` when the block ends (gloo reduces
    on the CPU)."""
    if not _reduced_on_host(values, backend):
        yield values
        return
    host = staging.stage(values)
    yield host
    staging.unstage(host, values)


class _DoneWork:
    """A collective that already finished (the shared-memory sum)."""

    def wait(self) -> None:
        return None


class HostStagedWork:
    """A gloo collective started on a host copy of a GPU tensor: :meth:`wait` waits, then writes it back."""

    def __init__(self, work: Any, host: Any, values: Any, staging: HostStaging) -> None:
        self.work, self.host, self.values, self.staging = work, host, values, staging

    def wait(self) -> None:
        self.work.wait()
        self.staging.unstage(self.host, self.values)


def write_grads(params: list[Any], indices: list[int], flat: Any) -> None:
    """Set the gradients of ``params[i]`` for ``i`` in ``indices`` from ``flat``, their concatenation in order."""
    offset = 0
    for i in indices:
        param = params[i]
        reduced = flat[offset:offset + param.numel()].view_as(param)
        offset += param.numel()
        if param.grad is None:
            param.grad = reduced.clone()
        else:
            param.grad.copy_(reduced)


def launched_by_torchrun() -> bool:
    """True when the torchrun variables describe more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError as exc:
        raise InputError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from exc


def rank_cuda_index(local_rank: int) -> int:
    """The CUDA device a local rank computes on: one GPU per process, ``cuda:LOCAL_RANK``.

    (``benchmarks/multi_gpu.py --one-gpu`` replaces this to put two gloo ranks on one GPU, which measures a
    rank's host RAM, not its speed.)
    """
    return local_rank


def init_from_env(device_name: str = "auto", backend: str = "auto") -> tuple[DistContext, Any]:
    """Join the torchrun job described by the environment; return ``(context, compute device)``.

    Args:
        device_name: ``train.device`` (auto, cpu, cuda). On CUDA each rank computes on
            ``cuda:LOCAL_RANK``.
        backend: ``train.dist_backend``: auto (NCCL on CUDA, gloo on the CPU), nccl or gloo.

    Raises:
        InputError: a torchrun variable is missing or malformed, there are fewer visible GPUs
            than local ranks, or NCCL was asked for a CPU run.
    """
    import torch

    world_size = _env_int("WORLD_SIZE", 1)
    wants_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if world_size <= 1:
        return DistContext(), None
    missing = [k for k in _ENV_KEYS if not os.environ.get(k)]
    if missing:
        raise InputError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with "
                         f"`torchrun --nproc-per-node N -m streamtune train CONFIG`")
    ctx = DistContext(rank=_env_int("RANK", 0), world_size=world_size, local_rank=_env_int("LOCAL_RANK", 0),
                      local_world_size=_env_int("LOCAL_WORLD_SIZE", 1), timeout_s=timeout_s())
    limit_malloc_arenas()  # before CUDA, NCCL and the compile pool start their threads (host RAM per rank)
    device = torch.device("cpu")
    if wants_cuda:
        index = rank_cuda_index(ctx.local_rank)
        if index >= torch.cuda.device_count():
            raise InputError(f"train.device: local rank {ctx.local_rank} needs cuda:{index} but torch sees "
                             f"{torch.cuda.device_count()} GPU(s); lower --nproc-per-node")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    local_sum.mode()  # a bad STREAMTUNE_LOCAL_SUM fails here, before any weights are loaded
    ctx.backend = ("nccl" if wants_cuda else "gloo") if backend == "auto" else backend
    if ctx.backend == "nccl" and not wants_cuda:
        raise InputError("train.dist_backend: nccl needs CUDA, and this run trains on the CPU; use gloo or auto")
    ctx.device = device
    share_compile_workers(ctx.local_world_size)
    _init_group(ctx, device)
    return ctx, device


def share_compile_workers(local_world_size: int) -> int | None:
    """Give each local rank its share of the host's cores for Inductor's compile workers; returns the share.

    Problem: every process that compiles starts Inductor's pool of ``min(32, cores)`` worker processes, so N
    local ranks start N full pools: N times the workers' host memory (likely part of the 2.07 GB the second
    rank added on two H200s; not separated there) and N times more compile processes than cores.
    Solution: ``cores // N`` workers per rank, the same total as one process. A ``TORCHINDUCTOR_COMPILE_THREADS``
    the user set is kept (None).
    """
    import sys

    if local_world_size <= 1 or COMPILE_THREADS_ENV in os.environ:
        return None
    share = compile_workers_per_process(local_world_size)
    os.environ[COMPILE_THREADS_ENV] = str(share)  # read when torch._inductor.config is first imported
    config = sys.modules.get("torch._inductor.config")
    if config is not None:  # imported already: its pool starts at the first compile, so this still counts
        config.compile_threads = share
    return share


def _init_group(ctx: DistContext, device: Any) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out NCCL op aborts, not hangs
    kwargs: dict[str, Any] = {"backend": ctx.backend, "rank": ctx.rank, "world_size": ctx.world_size,
                              "timeout": timedelta(seconds=ctx.timeout_s)}
    if ctx.backend == "nccl":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(**kwargs)
    except (RuntimeError, ValueError) as exc:
        raise StreamtuneError(f"rank {ctx.rank}: could not join the {ctx.backend} process group at "
                              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                              f"{ctx.timeout_s:.0f} s: {exc}") from exc
