"""What ``MODEL_OR_ADAPTER`` names: a base model, an adapter, a run checkpoint or a run directory.

A base model is a preset name or a HF checkpoint directory (``config.json``). An adapter is a
directory holding ``adapter_config.json`` (``RUN/adapter`` or ``RUN/checkpoints/step-N``); its base
model is found from its ``streamtune.json`` (or PEFT's ``base_model_name_or_path``), as ``merge``
finds it. A run directory (``config.yaml``) stands for its final adapter, or its newest checkpoint
when the run has not finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamtune.errors import InputError

RUN_CONFIG_FILE = "config.yaml"
ADAPTER_CONFIG_FILE = "adapter_config.json"


@dataclass
class ModelSource:
    """A resolved ``MODEL_OR_ADAPTER``.

    Attributes:
        base_name: preset name or absolute checkpoint directory of the base model.
        seed: seed of a preset's random weights.
        trust_remote_code: as the run had it.
        adapter_dir: the adapter directory, or None for a bare base model.
        run_dir: the run the adapter came from, when known (its config gives codec, plan, data settings).
        run_config: the run's ``config.yaml`` as a dict (empty when unknown).
        tokenizer_dir: a directory holding the tokenizer to use, or None (the base model's).
    """

    base_name: str
    seed: int = 0
    trust_remote_code: bool = False
    adapter_dir: Path | None = None
    run_dir: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: Path | None = None

    @property
    def label(self) -> str:
        return str(self.adapter_dir) if self.adapter_dir is not None else self.base_name


def resolve_source(spec: str, key: str = "MODEL_OR_ADAPTER") -> ModelSource:
    """Resolve a preset or bundled model name, checkpoint, adapter, run checkpoint or run directory.

    Raises:
        InputError: ``spec`` is none of these (the message says what each needs).
    """
    from streamtune.models import is_preset
    from streamtune.models.bundled import bundled_checkpoint, is_bundled

    path = Path(spec).expanduser()
    if is_bundled(spec) and not path.exists():
        path = bundled_checkpoint(spec)  # converted once, then a plain checkpoint directory
    if path.is_dir():
        if (path / ADAPTER_CONFIG_FILE).is_file():
            return _adapter_source(path)
        if (path / RUN_CONFIG_FILE).is_file():
            return _run_source(path, key)
        if (path / "config.json").is_file():
            return ModelSource(base_name=str(path.resolve()))
        raise InputError(
            f"{key}: {str(path)!r} is neither a model directory (config.json), an adapter "
            f"({ADAPTER_CONFIG_FILE}) nor a run directory ({RUN_CONFIG_FILE})"
        )
    if is_preset(spec):
        return ModelSource(base_name=spec)
    raise InputError(
        f"{key}: {spec!r} does not exist; pass a preset name (e.g. tiny-gemma4), a HF checkpoint directory, "
        f"an adapter directory (RUN/adapter, RUN/checkpoints/step-N) or a run directory"
    )


def _run_source(run_dir: Path, key: str) -> ModelSource:
    from streamtune.train.checkpoint import list_checkpoints

    if (run_dir / "adapter" / ADAPTER_CONFIG_FILE).is_file():
        return _adapter_source(run_dir / "adapter")
    found = [p for _, p in list_checkpoints(run_dir) if (p / ADAPTER_CONFIG_FILE).is_file()]
    if found:
        return _adapter_source(found[-1])
    raise InputError(
        f"{key}: the run {str(run_dir)!r} has neither a final adapter (adapter/) nor a checkpoint "
        f"with {ADAPTER_CONFIG_FILE}; train it (or resume it) until it saves one"
    )


def run_dir_of(adapter_dir: Path) -> Path | None:
    """The run an adapter belongs to: ``RUN/adapter`` or ``RUN/checkpoints/step-N``."""
    for candidate in (adapter_dir.parent, adapter_dir.parent.parent):
        if (candidate / RUN_CONFIG_FILE).is_file():
            return candidate
    return None


def _adapter_source(adapter_dir: Path) -> ModelSource:
    from streamtune.lora.adapter import read_base_info

    adapter_dir = adapter_dir.resolve()
    info = read_base_info(adapter_dir)
    name = info.get("model_name")
    if not name:
        raise InputError(
            f"MODEL_OR_ADAPTER: {str(adapter_dir)!r} does not say which base model it was trained on "
            "(no streamtune.json and no base_model_name_or_path)"
        )
    run_dir = run_dir_of(adapter_dir)
    run_config = _read_run_config(run_dir) if run_dir is not None else {}
    tokenizer_dir = None
    for candidate in (adapter_dir, run_dir / "adapter" if run_dir else None):
        if candidate is not None and (candidate / "tokenizer_config.json").is_file():
            tokenizer_dir = candidate
            break
    if tokenizer_dir is None and (run_config.get("model") or {}).get("tokenizer"):
        tokenizer_dir = Path(run_config["model"]["tokenizer"])
    return ModelSource(base_name=str(name), seed=int(info.get("seed", 0)),
                       trust_remote_code=bool(info.get("trust_remote_code", False)), adapter_dir=adapter_dir,
                       run_dir=run_dir, run_config=run_config, tokenizer_dir=tokenizer_dir)


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load((run_dir / RUN_CONFIG_FILE).read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"MODEL_OR_ADAPTER: {run_dir / RUN_CONFIG_FILE} is not valid YAML: {exc}") from exc
    return raw if isinstance(raw, dict) else {}
