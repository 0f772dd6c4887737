"""GPU side: a ring of slots, a copy stream, events, and the prefetch/eviction policy.

Problem: a slot may be refilled only when no kernel can still read it, and compute may read a slot
only when its copy has landed. Solution: two events per slot and layer, recorded and waited on
explicitly (never host synchronisation):
- ``ready[slot]``: recorded on the copy stream after the H2D copy; the compute stream waits on it.
- ``free[slot]``: recorded on the compute stream when the layer using the slot is released; the copy
  stream waits on it before overwriting the slot.

The access order of streamed layers is known (forward ascending, backward descending, repeated per
micro-batch), so eviction is Belady's: refill the slot whose layer is needed furthest in the future.
That alone gives the turnaround: the last layers of the forward are still in their slots when the
backward starts, and the first ones when the next forward starts.

On a CPU the same code runs with synchronous copies and no events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from streamtune.offload.host import LayerPack

FORWARD = "forward"
BACKWARD = "backward"


@dataclass
class Slot:
    """One GPU buffer of the ring."""

    buffer: torch.Tensor
    layer: int | None = None
    bound: bool = False
    ready: torch.cuda.Event | None = None
    free: torch.cuda.Event | None = None


@dataclass
class TransferStats:
    """Transfers since the last reset."""

    h2d_bytes: int = 0
    num_copies: int = 0
    copy_events: list = field(default_factory=list)
    wait_events: list = field(default_factory=list)
    cpu_copy_s: float = 0.0


class SlotRing:
    """Slots, copy stream and the schedule of streamed layers.

    Args:
        packs: packed host buffers of the streamed layers, by decoder index.
        device: the compute device (CUDA or CPU).
        num_slots: ring size (>= 1).
        prefetch: layers copied ahead of the one computing.
    """

    def __init__(self, packs: dict[int, LayerPack], device: torch.device, num_slots: int, prefetch: int):
        self.packs = packs
        self.device = device
        self.cuda = device.type == "cuda"
        self.order = sorted(packs)
        self.position = {layer: i for i, layer in enumerate(self.order)}
        self.prefetch = max(0, prefetch)
        slot_nbytes = max((p.nbytes for p in packs.values()), default=0)
        self.slots = [Slot(torch.empty(slot_nbytes, dtype=torch.uint8, device=device))
                      for _ in range(max(1, num_slots))]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.stats = TransferStats()
        self.cursor = (FORWARD, -1, True)
        self.skip_free_wait = False  # test hook: drop the free-event wait to show the race it prevents

    @property
    def slot_nbytes(self) -> int:
        return self.slots[0].buffer.numel()

    # -- schedule -------------------------------------------------------------------------------

    def _future(self, length: int) -> list[int]:
        """The next ``length`` streamed-layer uses after the current one (the cursor).

        One micro-batch uses the layers ascending (forward), then descending (backward) when a
        backward is expected; the pattern repeats for the next micro-batch.
        """
        phase, pos, backward_expected = self.cursor
        cycle = self.order + self.order[::-1] if backward_expected else self.order
        if not cycle:
            return []
        start = pos + 1 if phase == FORWARD else len(self.order) + pos + 1
        return [cycle[(start + i) % len(cycle)] for i in range(length)]

    def _distance(self, layer: int, future: list[int]) -> int:
        try:
            return future.index(layer)
        except ValueError:
            return len(future) + 1

    def _slot_of(self, layer: int) -> Slot | None:
        for slot in self.slots:
            if slot.layer == layer:
                return slot
        return None

    def _victim(self, needed_at: int, future: list[int]) -> Slot | None:
        """The unbound slot whose layer is needed last, if that is later than ``needed_at``."""
        best, best_distance = None, needed_at
        for slot in self.slots:
            if slot.bound:
                continue
            distance = len(future) + 2 if slot.layer is None else self._distance(slot.layer, future)
            if distance > best_distance:
                best, best_distance = slot, distance
        return best

    # -- copies ---------------------------------------------------------------------------------

    def _copy_into(self, slot: Slot, layer: int) -> None:
        pack = self.packs[layer]
        n = pack.nbytes
        slot.layer = layer
        self.stats.h2d_bytes += n
        self.stats.num_copies += 1
        if not self.cuda:
            start = time.perf_counter()
            slot.buffer[:n].copy_(pack.buffer)
            self.stats.cpu_copy_s += time.perf_counter() - start
            return
        with torch.cuda.stream(self.copy_stream):
            if slot.free is not None and not self.skip_free_wait:
                # copy stream waits for the compute stream's last read of this slot
                self.copy_stream.wait_event(slot.free)
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.copy_stream)
            slot.buffer[:n].copy_(pack.buffer, non_blocking=True)
            # compute stream waits on this before reading the slot (see acquire)
            slot.ready = torch.cuda.Event(enable_timing=True)
            slot.ready.record(self.copy_stream)
            self.stats.copy_events.append((start, slot.ready))

    def prefetch_ahead(self, future: list[int]) -> None:
        """Start copies for the next ``prefetch`` uses (``future``: the uses after the current one)."""
        if self.prefetch == 0 or not self.order:
            return
        for needed_at, layer in enumerate(future[:self.prefetch]):
            if self._slot_of(layer) is not None:
                continue
            victim = self._victim(needed_at, future)
            if victim is None:
                return
            self._copy_into(victim, layer)

    # -- use by compute -------------------------------------------------------------------------

    def acquire(self, layer: int, phase: str, backward_expected: bool) -> Slot:
        """Make ``layer``'s bytes available to the compute stream and mark its slot bound.

        Raises:
            RuntimeError: every slot is bound (a layer re-entered while another is computing).
        """
        pos = self.position[layer]
        self.cursor = (phase, pos if phase == FORWARD else len(self.order) - 1 - pos, backward_expected)
        future = [layer] + self._future(len(self.order) * 2 + 2)
        slot = self._slot_of(layer)
        if slot is None:
            slot = self._victim(0, future)
            if slot is None:
                raise RuntimeError(f"layer {layer}: no free slot among {len(self.slots)} (all bound)")
            self._copy_into(slot, layer)
        slot.bound = True
        if self.cuda and slot.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            before = torch.cuda.Event(enable_timing=True)
            before.record(compute)
            # compute stream waits for the copy stream's copy of this layer
            compute.wait_event(slot.ready)
            after = torch.cuda.Event(enable_timing=True)
            after.record(compute)
            self.stats.wait_events.append((before, after))
        self.prefetch_ahead(future[1:])
        return slot

    def release(self, layer: int) -> None:
        """The compute stream is done enqueueing work on ``layer``'s slot."""
        slot = self._slot_of(layer)
        if slot is None:
            return
        slot.bound = False
        if self.cuda:
            # a later copy into this slot waits for every kernel enqueued so far on the compute stream
            slot.free = torch.cuda.Event()
            slot.free.record(torch.cuda.current_stream(self.device))

    # -- metrics --------------------------------------------------------------------------------

    def pop_stats(self) -> dict[str, float]:
        """Transfer metrics since the last call (synchronises on the recorded events)."""
        stats, self.stats = self.stats, TransferStats()
        if self.cuda:
            copy_s = sum(s.elapsed_time(e) for s, e in _completed(stats.copy_events)) / 1e3
            wait_s = sum(b.elapsed_time(a) for b, a in _completed(stats.wait_events)) / 1e3
        else:
            copy_s, wait_s = stats.cpu_copy_s, 0.0
        return {
            "h2d_bytes": stats.h2d_bytes,
            "h2d_copies": stats.num_copies,
            "h2d_s": copy_s,
            "h2d_gbps": stats.h2d_bytes / copy_s / 1e9 if copy_s > 0 else 0.0,
            "copy_wait_s": wait_s,
        }


def _completed(pairs: list) -> list:
    for _, end in pairs:
        end.synchronize()
    return pairs
