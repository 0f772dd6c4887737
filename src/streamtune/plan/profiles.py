"""Link and compute speeds of a GPU: named defaults and the profile measured by ``streamtune bench --link``.

A measured profile is cached as JSON in ``~/.cache/streamtune/link.json`` (``$XDG_CACHE_HOME`` is honoured)::

    {"h2d_gbps": 54.2, "dequant_gbps": {"int8": 900.0, "nf4": 700.0}, "matmul_tflops": 610.0,
     "gpu_name": "NVIDIA H200", "gpu_memory_bytes": 150...}

``gpu_memory_bytes``, ``hbm_gbps`` and ``decode_numel`` (the size of the tensor the decode speeds were
timed on; ``DECODE_TIMING_NUMEL`` now) are optional there. All speeds are in 10**9 bytes/s (GB/s) and
10**12 FLOP/s; dequantisation speed counts bf16 output bytes per second.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from streamtune.errors import InputError

GIB = 2**30
# Share of a card's dense bf16 peak that training kernels reach (mixed matmul sizes, MoE routing,
# attention). Measured profiles replace it with a real number.
ACHIEVED_MATMUL_FRACTION = 0.55
# Share of the HBM bandwidth that memory-bound kernels (expert weights at small token counts, LoRA folds) reach.
ACHIEVED_HBM_FRACTION = 0.75
# Dequantisation speed, in bf16 output bytes/s, as a share of the HBM bandwidth when not measured.
DEQUANT_HBM_FRACTION = {"int8": 0.45, "nf4": 0.35}
# Elements of the tensor a profile's decode speeds are timed on (512 MB of bf16 output, a large layer tensor's
# size). Before session 15 the card's own quick measurement used 16 Mi (32 MB), which kernel launches dominate
# (nf4 160 GB/s instead of 1.2 TB/s on an H200); profiles cached without this number are measured again.
DECODE_TIMING_NUMEL = 1 << 28


@dataclass(frozen=True)
class LinkProfile:
    """Speeds and memory of one GPU.

    Attributes:
        gpu_name: the card's name.
        gpu_memory_bytes: memory of the card (the default GPU budget).
        h2d_gbps: pinned host-to-device copy speed, 10**9 bytes/s.
        matmul_tflops: achieved bf16 matmul speed, 10**12 FLOP/s.
        hbm_gbps: achieved GPU memory bandwidth, 10**9 bytes/s.
        dequant_gbps: per codec, bf16 bytes/s produced by dequantisation, 10**9 bytes/s.
        source: where the numbers come from (``default rtx4090`` or the cache file path).
        decode_numel: elements of the tensor ``dequant_gbps`` was timed on (None: not recorded).
    """

    gpu_name: str
    gpu_memory_bytes: int
    h2d_gbps: float
    matmul_tflops: float
    hbm_gbps: float
    dequant_gbps: dict[str, float] = field(default_factory=dict)
    source: str = "default"
    decode_numel: int | None = None

    def dequant_gbps_for(self, codec: str) -> float:
        """Dequantisation speed of ``codec`` (bf16 output GB/s); bf16 needs none (infinite)."""
        if codec == "bf16":
            return float("inf")
        if codec in self.dequant_gbps:
            return self.dequant_gbps[codec]
        return self.hbm_gbps * DEQUANT_HBM_FRACTION.get(codec, 0.35)


def _named(name: str, memory_gib: float, h2d_gbps: float, peak_tflops: float, hbm_peak_gbps: float) -> LinkProfile:
    return LinkProfile(
        gpu_name=name, gpu_memory_bytes=int(memory_gib * GIB), h2d_gbps=h2d_gbps,
        matmul_tflops=peak_tflops * ACHIEVED_MATMUL_FRACTION, hbm_gbps=hbm_peak_gbps * ACHIEVED_HBM_FRACTION,
        source=f"default {name}",
    )


# Peak dense bf16 TFLOP/s (fp32 accumulate) and HBM GB/s from the vendors' data sheets; pinned H2D as
# measured on PCIe 4 x16 (~25 GB/s) and PCIe 5 x16 (54 GB/s on an H200).
GPU_PROFILES: dict[str, LinkProfile] = {
    "rtx4090": _named("rtx4090", 24, 25.0, 165.2, 1008),
    "rtx3090": _named("rtx3090", 24, 24.0, 71.0, 936),
    "a100-40g": _named("a100-40g", 40, 25.0, 312.0, 1555),
    "a100-80g": _named("a100-80g", 80, 25.0, 312.0, 2039),
    "h100": _named("h100", 80, 54.0, 989.0, 3350),
    "h200": _named("h200", 140, 54.0, 989.0, 4800),
    # RTX PRO 2000 Blackwell (GB206, 70 W): 16 GB GDDR7 at 288 GB/s, PCIe 5.0 x8, 67.9 TFLOP/s dense bf16
    # tensor (fp32 accumulate), per the third-party spec listings cputronic.com (bandwidth, bus) and
    # hmc-tech.com (tensor rates; consistent with NVIDIA's 545 AI TOPS fp4 sparse). H2D not measured:
    # half of the 54 GB/s measured on PCIe 5 x16.
    "rtx-pro-2000": _named("rtx-pro-2000", 16, 27.0, 67.9, 288),
}
DEFAULT_GPU = "rtx4090"


def link_profile_path() -> Path:
    """``$XDG_CACHE_HOME/streamtune/link.json`` (default ``~/.cache/streamtune/link.json``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "streamtune" / "link.json"


def load_link_profile(path: str | Path | None = None) -> LinkProfile | None:
    """The measured profile cached by ``streamtune bench --link``, or None when there is none.

    Missing optional fields (``gpu_memory_bytes``, ``hbm_gbps``, ``dequant_gbps``) are taken from the
    named profile whose name appears in ``gpu_name`` (else the rtx4090 defaults).

    Raises:
        InputError: the file exists but is not valid JSON or lacks ``h2d_gbps``/``matmul_tflops``.
    """
    path = Path(path) if path is not None else link_profile_path()
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        h2d = float(raw["h2d_gbps"])
        tflops = float(raw["matmul_tflops"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"link profile {path}: unreadable ({exc}); rerun `streamtune bench --link` or delete the file"
        ) from exc
    return profile_from_measurement({**raw, "h2d_gbps": h2d, "matmul_tflops": tflops}, source=str(path))


def profile_from_measurement(raw: dict, source: str = "measured") -> LinkProfile:
    """A profile from measured speeds (``h2d_gbps``, ``matmul_tflops``, optional ``gpu_name``,
    ``gpu_memory_bytes``, ``hbm_gbps``, ``dequant_gbps``); what is missing comes from the named profile
    whose name appears in ``gpu_name`` (else the rtx4090 defaults)."""
    gpu_name = str(raw.get("gpu_name") or "measured")
    like = closest_named(gpu_name)
    return LinkProfile(
        gpu_name=gpu_name,
        gpu_memory_bytes=int(raw.get("gpu_memory_bytes") or like.gpu_memory_bytes),
        h2d_gbps=float(raw["h2d_gbps"]), matmul_tflops=float(raw["matmul_tflops"]),
        hbm_gbps=float(raw.get("hbm_gbps") or like.hbm_gbps),
        dequant_gbps={str(k): float(v) for k, v in (raw.get("dequant_gbps") or {}).items()},
        source=source,
        decode_numel=int(raw["decode_numel"]) if raw.get("decode_numel") else None,
    )


def save_link_profile(
    h2d_gbps: float, matmul_tflops: float, gpu_name: str, dequant_gbps: dict[str, float] | None = None,
    gpu_memory_bytes: int | None = None, hbm_gbps: float | None = None, path: str | Path | None = None,
    decode_numel: int | None = None,
) -> Path:
    """Write a measured profile (the format :func:`load_link_profile` reads) and return its path."""
    path = Path(path) if path is not None else link_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    raw: dict = {"h2d_gbps": float(h2d_gbps), "dequant_gbps": dict(dequant_gbps or {}),
                 "matmul_tflops": float(matmul_tflops), "gpu_name": gpu_name}
    if gpu_memory_bytes is not None:
        raw["gpu_memory_bytes"] = int(gpu_memory_bytes)
    if hbm_gbps is not None:
        raw["hbm_gbps"] = float(hbm_gbps)
    if decode_numel is not None:
        raw["decode_numel"] = int(decode_numel)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    tmp.replace(path)
    return path


_NAME_HINTS = (("h200", "h200"), ("h100", "h100"), ("a100", "a100-80g"), ("4090", "rtx4090"), ("3090", "rtx3090"),
               ("pro 2000", "rtx-pro-2000"))


def closest_named(gpu_name: str) -> LinkProfile:
    """The named profile whose name appears in ``gpu_name`` (else the rtx4090 defaults)."""
    key = gpu_name.lower()
    for hint, name in _NAME_HINTS:
        if hint in key:
            return GPU_PROFILES[name]
    return GPU_PROFILES[DEFAULT_GPU]


def resolve_link_profile(gpu: str | None = None, path: str | Path | None = None) -> LinkProfile:
    """The profile to plan with: the named one when ``gpu`` is given, else the measured one, else rtx4090.

    Raises:
        InputError: ``gpu`` is not a known name (the message lists them).
    """
    if gpu is not None:
        key = gpu.lower()
        if key not in GPU_PROFILES:
            raise InputError(f"--gpu: {gpu!r} is not a known GPU; known: {', '.join(GPU_PROFILES)}")
        return GPU_PROFILES[key]
    measured = load_link_profile(path)
    return measured if measured is not None else GPU_PROFILES[DEFAULT_GPU]


def resolve_gpu_list(text: str) -> list[LinkProfile]:
    """``rtx4090,rtx-pro-2000`` as named profiles, in order.

    Raises:
        InputError: an unknown name (the message lists the known ones).
    """
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise InputError(f"--gpu: {text!r} names no GPU; known: {', '.join(GPU_PROFILES)}")
    return [resolve_link_profile(name) for name in names]


def replace(profile: LinkProfile, **changes) -> LinkProfile:
    """A copy of ``profile`` with some fields changed."""
    return dataclasses.replace(profile, **changes)
