"""The gradient all-reduce overlapped with the last backward sums exactly what the flat all-reduce sums, with
buckets started in the same order on every rank (two gloo processes), and its buckets are laid out as documented."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from streamtune.distributed.context import DistContext
from streamtune.distributed.overlap import OverlappedGradReduce, make_buckets, make_grad_reduce


def test_buckets_run_from_the_last_parameter_and_split_by_size_and_dtype():
    params = [torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(4), torch.zeros(32)]
    # fp32 4 elements = 16 bytes; 40-byte buckets: [4] alone (128 B), [3], [2] (fp64), [1, 0]
    assert make_buckets(params, bucket_bytes=40) == [[4], [3], [2], [1, 0]]
    assert make_buckets(params[:2], bucket_bytes=1 << 20) == [[1, 0]]


def test_no_overlap_without_ranks_or_when_off():
    params = [torch.zeros(2, requires_grad=True)]
    assert make_grad_reduce(DistContext(), params, overlap=True) is None
    assert make_grad_reduce(DistContext(world_size=2, backend="gloo"), params, overlap=False) is None


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 1))


def _grads(rank: int, overlap: bool, unused: torch.nn.Parameter, ctx: DistContext) -> list[torch.Tensor]:
    model = _model(0)
    params = [*model.parameters(), unused]
    reduce = OverlappedGradReduce(ctx, params, bucket_bytes=300) if overlap else None
    micro = [] if rank == 1 else [torch.randn(5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for index, x in enumerate(micro):  # rank 1 has no micro-batch this step: it never arms
        if reduce is not None and index == len(micro) - 1:
            reduce.arm()
        model(x).pow(2).sum().backward()
    if reduce is not None:
        assert len(reduce.buckets) > 2
        reduce.finish()
        assert not reduce._hooks and not reduce._in_flight
    else:
        ctx.all_reduce_grads(params)
    return [p.grad.clone() for p in params]


def _rank(rank: int, port: int, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2, backend="gloo", timeout_s=30)
    flat = _grads(rank, False, torch.nn.Parameter(torch.ones(3)), ctx)
    overlapped = _grads(rank, True, torch.nn.Parameter(torch.ones(3)), ctx)
    twice = _grads(rank, True, torch.nn.Parameter(torch.ones(3)), ctx)  # a second step reuses the reducer state
    results[rank] = (flat, overlapped, twice)
    dist.destroy_process_group()


def test_two_gloo_ranks_overlapped_sums_equal_the_flat_all_reduce():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, results), nprocs=2, join=True)
    for rank in (0, 1):
        flat, overlapped, twice = results[rank]
        assert torch.count_nonzero(flat[-1]) == 0  # the unused parameter: zeros from every rank
        for a, b, c in zip(flat, overlapped, twice):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)
    for a, b in zip(results[0][1], results[1][1]):  # both ranks hold the same sums
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bucket_bytes", [1, 1 << 30])
def test_each_bucket_is_summed_once_and_started_by_the_backward(bucket_bytes):
    """One collective per bucket (one per parameter with 1-byte buckets, one in all with huge ones)."""
    started = []

    class Ctx:
        active = True

        def all_reduce_sum_async(self, values, what):
            started.append(values.numel())
            return None

        def wait_collective(self, work, what):
            pass

    model = _model(1)
    params = list(model.parameters())
    reduce = OverlappedGradReduce(Ctx(), params, bucket_bytes=bucket_bytes)
    reduce.arm()
    model(torch.randn(2, 8)).sum().backward()
    expected = [p.numel() for p in reversed(params)] if bucket_bytes == 1 else [sum(p.numel() for p in params)]
    assert started == expected  # every bucket started inside the backward, not after it
    reduce.finish()
    assert started == expected
