"""Known bugs of the stock HF stack (transformers device_map offload + peft + bitsandbytes) for Gemma4.

Each registry entry has a tiny reproducer and, where still needed, an in-memory fix.
``check()`` says what reproduces on the installed versions, ``apply()`` installs the fixes whose
reproducer fails (idempotent), ``revert()`` restores the originals; nothing in site-packages is edited.
Importing this package imports neither torch nor bitsandbytes.
"""

from streamtune.compat.api import applied, apply, check, revert, select
from streamtune.compat.entries import ENTRIES, FIX_INSTALLERS
from streamtune.compat.offload_lora import fix_offloaded_lora
from streamtune.compat.registry import Entry, Outcome, Result, versions

__all__ = ["ENTRIES", "FIX_INSTALLERS", "Entry", "Outcome", "Result", "applied", "apply", "check",
           "fix_offloaded_lora", "revert", "select", "versions"]
