"""The layer-split settings of a run config: ``train.devices``, ``memory.layer_split``, ``memory.gpu_budgets``."""

from __future__ import annotations

import re
from typing import Any

from streamtune.units import parse_bytes

_DEVICE_RE = re.compile(r"^(cpu|cuda:[0-9]+)$")


def parse_layer_split(text: str) -> list[int] | None:
    """``memory.layer_split`` as boundaries (None for auto).

    Raises:
        ValueError: not ``auto`` nor comma-separated positive integers.
    """
    if str(text).strip() == "auto":
        return None
    parts = [part.strip() for part in str(text).split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"{text!r}: write auto, or the first decoder layer of each device after the first, e.g. 14 or 10,20")
    return [int(part) for part in parts]


def check_layer_split(cfg: Any) -> list[str]:
    """The problems of ``train.devices``, ``memory.layer_split`` and ``memory.gpu_budgets`` (empty when valid)."""
    p: list[str] = []
    devices, mem = cfg.train.devices, cfg.memory
    if not devices:
        if mem.gpu_budgets:
            p.append("memory.gpu_budgets: per-device budgets need train.devices (a layer split); for one GPU use "
                     "memory.gpu_budget")
        if str(mem.layer_split) != "auto":
            p.append("memory.layer_split: needs train.devices, e.g. train.devices=[cuda:0,cuda:1]")
        return p
    bad = [d for d in devices if not _DEVICE_RE.match(d)]
    kinds = {d.split(":")[0] for d in devices}
    if bad:
        p.append(f"train.devices: {bad} not allowed; write devices as cpu or cuda:N, e.g. [cuda:0, cuda:1]")
    elif len(devices) < 2:
        p.append("train.devices: a layer split needs two or more devices, e.g. [cuda:0, cuda:1]; for one device use "
                 "train.device and leave train.devices empty")
    elif len(kinds) > 1:
        p.append(f"train.devices: {devices} mixes cpu and cuda; use only cuda:N devices (or only cpu, for tests)")
    elif "cuda" in kinds and len(set(devices)) != len(devices):
        p.append(f"train.devices: {devices} names a GPU twice; name each GPU once")
    elif cfg.train.device not in ("auto", *kinds):
        p.append(f"train.device: {cfg.train.device} contradicts train.devices {devices}; set train.device=auto")
    if mem.gpu_budget is not None:
        p.append("memory.gpu_budget: with train.devices give one budget per device in memory.gpu_budgets, "
                 "e.g. [24GiB, 16GiB], and remove memory.gpu_budget")
    if mem.gpu_budgets and len(mem.gpu_budgets) != len(devices):
        p.append(f"memory.gpu_budgets: {len(mem.gpu_budgets)} budget(s) for {len(devices)} devices; give one per "
                 f"device of train.devices, e.g. [24GiB, 16GiB]")
    for value in mem.gpu_budgets:
        try:
            if parse_bytes(value) <= 0:
                raise ValueError(f"{value!r} must be positive")
        except ValueError as exc:
            p.append(f"memory.gpu_budgets: {exc}")
    try:
        boundaries = parse_layer_split(mem.layer_split)
    except ValueError as exc:
        p.append(f"memory.layer_split: {exc}")
        return p
    if boundaries is not None and len(boundaries) != len(devices) - 1:
        p.append(f"memory.layer_split: {len(devices)} devices need {len(devices) - 1} boundary layer(s), got "
                 f"{mem.layer_split!r}")
    elif boundaries is not None and any(a >= b for a, b in zip(boundaries, boundaries[1:])):
        p.append(f"memory.layer_split: {mem.layer_split!r} must increase, e.g. 10,20")
    return p
