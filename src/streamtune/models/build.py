"""Building models: from a preset (random weights) or a local HF directory, on meta/CPU/GPU."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any

from streamtune.errors import InputError
from streamtune.models.adapters import ArchAdapter, adapter_for
from streamtune.models.presets import PRESETS, is_preset, preset_config

_FILL_BLOCK_NUMEL = 1 << 20


def resolve_config(name: str, trust_remote_code: bool = False) -> Any:
    """The HF config of a preset name or a local checkpoint directory.

    Raises:
        InputError: ``name`` is neither a preset nor a directory holding config.json.
    """
    if is_preset(name):
        return preset_config(name)
    path = Path(name).expanduser()
    if not path.exists():
        raise InputError(
            f"model.name: {name!r} is neither a local directory nor a preset; "
            f"presets: {', '.join(PRESETS)}; a directory needs config.json and *.safetensors"
        )
    if not (path / "config.json").is_file():
        raise InputError(f"model.name: {str(path)!r} has no config.json; point it at a HF checkpoint directory")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"model.name: {path / 'config.json'} is not valid JSON: {exc}") from exc
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    adapter_for_or_input_error(config)
    return config


def adapter_for_or_input_error(config: Any) -> ArchAdapter:
    try:
        return adapter_for(config)
    except ValueError as exc:
        raise InputError(f"model.name: {exc}") from exc


def causal_lm_class(config: Any) -> Any:
    """The ``*ForCausalLM`` class that trains the text model of ``config``."""
    from transformers import AutoModelForCausalLM

    if getattr(config, "model_type", None) == "gemma4":
        from transformers.models.gemma4.modeling_gemma4 import Gemma4ForCausalLM

        return Gemma4ForCausalLM
    return AutoModelForCausalLM._model_mapping[type(config)]


def text_config(config: Any) -> Any:
    """Gemma4 multimodal configs train their text model only."""
    if getattr(config, "model_type", None) == "gemma4":
        return config.get_text_config()
    return config


def build_empty(config: Any, dtype: Any, device: Any = "meta") -> Any:
    """Construct the causal LM of ``config`` without initialising weights."""
    import torch

    cls = causal_lm_class(config)
    cfg = text_config(config)
    # Skip the random init on real devices: callers fill or load every weight (init of a 25 B
    # model with normal_ takes minutes; random_fill_ takes seconds).
    with torch.device(device), _no_init_weights():
        model = cls._from_config(cfg, dtype=dtype)
    model.tie_weights()  # skipped init also skipped the tying
    return model


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


_LAYER_KEY_RE = re.compile(r"layers\.\d+\..*$")


def fill_key(name: str) -> str:
    """The name a weight is seeded by: ``layers.N.<rest>`` for decoder-layer weights (whatever wraps
    the model, PEFT's ``base_layer`` included), the full name otherwise."""
    name = name.replace(".base_layer", "")
    match = _LAYER_KEY_RE.search(name)
    return match.group(0) if match else name


def fill_tensor_(data: Any, key: str, seed: int, std: float = 0.02) -> None:
    """Fill one weight with N(0, std) noise seeded by ``(seed, key)`` (norms with ones, biases with zeros).

    Each tensor has its own generator, so a model filled all at once (:func:`random_fill_`) and one
    filled tensor by tensor while it is packed (:class:`LazyPreset`) hold the same values. Tensors of
    more than 4 Mi elements repeat one random block (memcpy speed: a 25 B model fills in seconds);
    they are then not i.i.d., which is fine for speed and memory work.
    """
    import torch

    if data.dim() == 1:
        data.fill_(1.0 if "norm" in key or "scale" in key else 0.0)
        return
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 62))
    if data.numel() <= 4 * _FILL_BLOCK_NUMEL:
        data.copy_(torch.randn(data.shape, generator=gen) * std)
        return
    block = (torch.randn(_FILL_BLOCK_NUMEL, generator=gen) * std).to(data.dtype)
    flat = data.view(-1)
    for start in range(0, flat.numel(), _FILL_BLOCK_NUMEL):
        n = min(_FILL_BLOCK_NUMEL, flat.numel() - start)
        flat[start:start + n].copy_(block[:n])


def random_fill_(model: Any, seed: int, std: float = 0.02) -> None:
    """Fill every parameter of ``model`` with :func:`fill_tensor_` (seeded per tensor name).

    Raises:
        RuntimeError: a floating-point buffer was left on the meta device.
    """
    for name, param in model.named_parameters():
        fill_tensor_(param.data, fill_key(name), seed, std)
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and buf.device.type == "meta":
            raise RuntimeError(f"buffer {name} left on meta")


class LazyPreset:
    """A preset model whose decoder-layer weights are filled one tensor at a time while the engine packs them.

    Problem: building the whole bf16 model before encoding peaks at its full size (74 GB of RSS for the
    26B preset in an int8 run). Solution: decoder-layer parameters start as zero-byte placeholders;
    :meth:`load_tensor` (the engine's ``load_tensor`` hook, as for a checkpoint) fills each one just
    before it is encoded, so host RAM holds the packed layers plus one unpacked tensor.

    Attributes:
        model: the causal LM on the CPU (non-layer weights filled, layer weights placeholders).
        adapter: its ``ArchAdapter``.
    """

    def __init__(self, name_or_config: Any, dtype: Any, seed: int = 0):
        from streamtune.models.adapters import decoder_layers

        config = preset_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
        self.adapter = adapter_for(config)
        self.seed = seed
        self.model = build_empty(config, dtype, device="cpu")
        self.layers = decoder_layers(self.model)
        layer_ids = {id(p) for layer in self.layers for p in layer.parameters()}
        for param_name, param in self.model.named_parameters():
            if id(param) not in layer_ids:
                fill_tensor_(param.data, fill_key(param_name), seed)
        for layer in self.layers:
            for param in layer.parameters():
                param.data = _placeholder(tuple(param.shape), param.dtype)
        self.model.tie_weights()
        self.model.eval()

    def load_tensor(self, index: int, name: str, param: Any, out: Any = None, segment_numel: int | None = None,
                    consume: Any = None) -> None:
        """Fill decoder layer ``index``'s parameter ``name`` (same contract as ``CheckpointReader.load_tensor``)."""
        import torch

        from streamtune.hostmem import release_free_heap

        release_free_heap()  # the previous tensor's unpacked copy (see the reader's load_tensor)
        key = fill_key(f"layers.{index}.{name}")
        if out is not None:
            fill_tensor_(out, key, self.seed)
            return
        if param.data.untyped_storage().nbytes() >= param.numel() * param.element_size():
            return  # filled already (load_all)
        param.data = torch.empty(tuple(param.shape), dtype=param.dtype)
        fill_tensor_(param.data, key, self.seed)
        if consume is not None:
            consume(0, param.numel())

    def skip_layer(self, index: int) -> None:
        """Layer ``index`` came packed from elsewhere: nothing to do (nothing is read ahead)."""

    def finish(self) -> None:
        """Loading stats, as ``OpenedCheckpoint.finish`` gives them: none for random weights."""
        return None

    def load_all(self) -> Any:
        """Fill every decoder layer now (an ordinary CPU model, e.g. to save it); returns the model."""
        for index, layer in enumerate(self.layers):
            for name, param in layer.named_parameters():
                self.load_tensor(index, name, param)
        return self.model


def _placeholder(shape: tuple[int, ...], dtype: Any) -> Any:
    import torch

    return torch.zeros((), dtype=dtype).expand(shape)


def build_preset(name: str, dtype: Any, seed: int = 0) -> Any:
    """A preset model on the CPU with seeded random weights."""
    import torch

    config = preset_config(name)
    torch.manual_seed(seed)
    model = build_empty(config, dtype, device="cpu")
    random_fill_(model, seed)
    model.tie_weights()
    return model.eval()


def load_pretrained(path: str, dtype: Any, trust_remote_code: bool = False) -> Any:
    """A local HF checkpoint on the CPU, text model only, read shard by shard (one copy in RAM).

    Raises:
        InputError: the directory holds no safetensors weights, or they do not fit its config.json.
    """
    directory = Path(path)
    if not list(directory.glob("*.safetensors")):
        raise InputError(f"model.name: {str(directory)!r} holds no *.safetensors weights")
    from streamtune.loading import load_checkpoint

    model, _ = load_checkpoint(directory, dtype, trust_remote_code)
    return model.eval()


def build_model(name: str, dtype: Any, seed: int = 0, trust_remote_code: bool = False) -> tuple[Any, ArchAdapter]:
    """The model named by ``model.name`` (preset or directory) on the CPU, and its adapter.

    Raises:
        InputError: unknown name, missing files, unsupported architecture.
    """
    config = resolve_config(name, trust_remote_code)
    adapter = adapter_for_or_input_error(config)
    if is_preset(name):
        return build_preset(name, dtype, seed), adapter
    return load_pretrained(name, dtype, trust_remote_code), adapter
