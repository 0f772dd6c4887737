"""Opening a local HF checkpoint directory without ever holding two copies of it.

:func:`open_checkpoint` gives a model whose decoder layers are still on disk (placeholders) and the
reader whose ``load_tensor`` fills them, for ``streamtune.offload.place(..., load_tensor=...)``.
:func:`load_checkpoint` reads everything at once into a plain CPU model (merge, evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamtune.loading.reader import CheckpointReader


@dataclass
class OpenedCheckpoint:
    """A model built from a checkpoint's config.json, its layers to be read by ``reader``.

    Attributes:
        model: the stock causal LM on the CPU (decoder-layer parameters are placeholders until
            the engine's ``load_tensor`` hook fills them).
        adapter: its ``ArchAdapter``.
        reader: the :class:`CheckpointReader` (close it when loading is done).
    """

    model: Any
    adapter: Any
    reader: CheckpointReader

    def load_tensor(self, index: int, name: str, param: Any, out: Any = None, segment_numel: int | None = None,
                    consume: Any = None) -> None:
        """The engine's ``load_tensor`` hook (see :meth:`CheckpointReader.load_tensor`)."""
        self.reader.load_tensor(index, name, param, out, segment_numel, consume)

    def skip_layer(self, index: int) -> None:
        """Decoder layer ``index`` came packed from elsewhere (pack cache, shared host copy): do not read it."""
        self.reader.skip_layer(index)

    def finish(self) -> dict[str, float]:
        """Check that every layer was read, close the reader; returns its :meth:`~CheckpointReader.stats`.

        Raises:
            RuntimeError: some decoder-layer tensors were never loaded (a caller bug).
        """
        stats = self.reader.stats()
        pending = self.reader.pending_layers
        self.reader.close()
        if pending:
            raise RuntimeError(f"{pending} decoder-layer tensor(s) of {self.reader.directory} were never loaded")
        return stats


def open_checkpoint(path: str | Path, dtype: Any, trust_remote_code: bool = False, num_threads: int | None = None,
                    progress: bool | None = None) -> OpenedCheckpoint:
    """Build the model of ``path``'s config.json on the CPU and read all but its decoder layers.

    Every shard header is validated and every model tensor matched to the checkpoint (names and
    shapes) before anything is read.

    Args:
        path: checkpoint directory (config.json, ``*.safetensors``, optional index).
        dtype: the model's parameter dtype (checkpoint tensors are converted on the fly).
        trust_remote_code: passed to ``AutoConfig`` only.
        num_threads: reader threads.
        progress: show a progress bar (default: on a terminal).

    Raises:
        InputError: no config.json or weights, unsupported architecture, corrupt or truncated shards,
            missing tensors or shapes that do not match.
    """
    from streamtune.models.build import adapter_for_or_input_error, build_empty, resolve_config

    directory = Path(path).expanduser()
    config = resolve_config(str(directory), trust_remote_code)
    adapter = adapter_for_or_input_error(config)
    reader = CheckpointReader(directory, config, adapter, num_threads=num_threads, progress=progress)
    try:
        model = build_empty(config, dtype, device="cpu")
        reader.prepare(model)
    except BaseException:
        reader.close()
        raise
    return OpenedCheckpoint(model.eval(), adapter, reader)


def load_checkpoint(path: str | Path, dtype: Any, trust_remote_code: bool = False,
                    num_threads: int | None = None, progress: bool | None = None) -> tuple[Any, Any]:
    """Read a checkpoint directory into a plain CPU model (text model only).

    Returns:
        ``(model, adapter)``.

    Raises:
        InputError: see :func:`open_checkpoint`.
    """
    opened = open_checkpoint(path, dtype, trust_remote_code, num_threads, progress)
    try:
        opened.reader.load_all(opened.model)
    finally:
        opened.reader.close()
    return opened.model, opened.adapter


def is_checkpoint_dir(name: str) -> bool:
    """True when ``name`` is a directory (presets are not)."""
    return Path(name).expanduser().is_dir()


def open_base(model_cfg: Any, dtype: Any, progress: bool | None = None) -> Any:
    """The base model a run places: its decoder layers are filled as the engine packs them.

    A preset becomes a :class:`~streamtune.models.build.LazyPreset` (random weights per tensor), a
    directory an :class:`OpenedCheckpoint`; both give ``model``, ``adapter``, ``load_tensor``,
    ``skip_layer`` and ``finish()`` (loading stats, None for a preset).

    Args:
        model_cfg: ``RunConfig.model`` (name, seed, trust_remote_code).
        dtype: the model's parameter dtype.
        progress: show the shard reader's progress bar (default: on a terminal).

    Raises:
        InputError: see :func:`open_checkpoint`.
    """
    from streamtune.models import is_preset
    from streamtune.models.build import LazyPreset

    if is_preset(model_cfg.name):
        return LazyPreset(model_cfg.name, dtype, model_cfg.seed)
    return open_checkpoint(model_cfg.name, dtype, model_cfg.trust_remote_code, progress=progress)
