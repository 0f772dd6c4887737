"""The planner: will it fit, where does each decoder layer live, how fast will a step be.

Pure and CPU-only: the model is sized on the ``meta`` device from its config, nothing loads and nothing
touches CUDA. ``streamtune plan`` prints a plan; ``streamtune train`` calls ``plan.check()`` before loading
weights and places layers by ``plan.streamed_indices`` / ``plan.resident_indices`` / ``plan.ring_slots``.
"""

from streamtune.plan.planner import (
    CODECS,
    STREAM_MODES,
    LayerPlan,
    Plan,
    even_indices,
    make_plan,
    plan_for_run,
)
from streamtune.plan.profiles import (
    DEFAULT_GPU,
    GPU_PROFILES,
    LinkProfile,
    link_profile_path,
    load_link_profile,
    resolve_link_profile,
    save_link_profile,
)
from streamtune.plan.report import format_table

__all__ = [
    "CODECS", "DEFAULT_GPU", "GPU_PROFILES", "LayerPlan", "LinkProfile", "Plan", "STREAM_MODES", "even_indices",
    "format_table", "link_profile_path", "load_link_profile", "make_plan", "plan_for_run", "resolve_link_profile",
    "save_link_profile",
]
