"""Machine facts for ``streamtune doctor``: host RAM, CUDA devices and driver, pinned H2D bandwidth."""

from __future__ import annotations

import platform
from typing import Any

_H2D_BYTES = 256 << 20
_H2D_REPEATS = 5


def host_info() -> dict[str, Any]:
    """Python, platform, CPU count and host RAM."""
    import os

    import psutil

    memory = psutil.virtual_memory()
    return {"python": platform.python_version(), "platform": platform.platform(),
            "num_cpus": os.cpu_count(), "ram_total_bytes": memory.total, "ram_available_bytes": memory.available}


def cuda_info() -> dict[str, Any]:
    """CUDA build, driver and devices; ``{"available": False}`` without a GPU."""
    import torch

    info: dict[str, Any] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if not info["available"]:
        return info
    info["driver"] = _driver_version()
    info["devices"] = [{"index": i, "name": torch.cuda.get_device_name(i),
                        "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
                        "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                       for i in range(torch.cuda.device_count())]
    return info


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:
        pass
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return None


def pinned_h2d_gbps(num_bytes: int = _H2D_BYTES, repeats: int = _H2D_REPEATS) -> float | None:
    """Pinned host-to-device copy speed in GB/s (10^9 bytes/s), best of ``repeats``; None without CUDA
    (the planner's own probe, :func:`streamtune.devices.measure_h2d`)."""
    import torch

    if not torch.cuda.is_available():
        return None
    from streamtune.devices import measure_h2d

    return measure_h2d(num_bytes, pinned=True, repeats=repeats)
