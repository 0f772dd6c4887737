"""streamtune: LoRA fine-tuning of models bigger than the GPU.

Frozen base weights live in (compressed) pinned host RAM and stream to the GPU layer by layer,
overlapped with compute. Importing this package needs no GPU, no bitsandbytes and no network.
"""

__version__ = "0.1.0"

from streamtune.errors import ConfigError, InputError, StreamtuneError

__all__ = ["ConfigError", "InputError", "StreamtuneError", "__version__"]
