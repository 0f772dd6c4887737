"""Several GPUs or machines: torchrun process groups, data parallel over the adapter parameters,
one shared host copy of the packed weights per host, and plans for unequal GPUs.

Launch: ``torchrun --nproc-per-node N -m streamtune train CONFIG``. See
:mod:`streamtune.distributed.context` (process groups, timeouts) and
:mod:`streamtune.distributed.data_parallel` (what the global batch is, resume on another world size).
"""

from streamtune.distributed.context import DistContext, init_from_env, launched_by_torchrun

__all__ = ["DistContext", "init_from_env", "launched_by_torchrun"]
