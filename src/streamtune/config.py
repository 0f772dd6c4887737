"""Run configuration: dataclasses, YAML loading, dotted overrides, validation.

A run is ``RunConfig(model, data, lora, memory, train, output)``. Each field carries its help text in
``metadata["help"]``; ``streamtune train --help`` prints them. Validation reports every problem at once,
each naming the dotted key and what is allowed. This module must stay free of torch imports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamtune.config_split import check_layer_split, parse_layer_split  # noqa: F401  (re-exported)
from streamtune.errors import ConfigError
from streamtune.units import SIZE_FORMS, parse_bytes  # noqa: F401  (re-exported)

FORMATS = ("auto", "text", "alpaca", "messages", "sharegpt")
# Target names of data.fields (the record keys the formats read).
FIELD_TARGETS = ("instruction", "input", "output", "text", "messages", "conversations")
CODECS = ("bf16", "int8", "nf4")
STREAM_MODES = ("auto", "all", "none")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
DIST_BACKENDS = ("auto", "nccl", "gloo")
KERNEL_MODES = ("auto", "eager")  # streamtune.kernels.select.KERNEL_MODES (kept torch-free here)

# Config keys holding file-system paths (made absolute by load()).
PATH_KEYS = ("model.name", "model.tokenizer", "data.path", "data.eval_path", "output.dir", "memory.cache_dir")


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    name: str = _f("tiny-gemma4", "Local HF checkpoint directory, or a preset name (see `streamtune plan --help`).")
    dtype: str = _f("auto", "Compute dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32.")
    tokenizer: str | None = _f(None, "Tokenizer directory; default: the model directory, or the built-in tiny tokenizer for presets.")
    seed: int = _f(0, "Seed of the random weights of a preset model.")
    trust_remote_code: bool = _f(False, "Allow custom modeling code from the checkpoint directory.")


@dataclass
class DataConfig:
    path: str = _f("", "Training data: a .jsonl or .parquet file, or a directory written by datasets.save_to_disk.")
    format: str = _f("auto", "Record format: auto, text, alpaca (instruction/input/output), messages (chat) or sharegpt (conversations of from/value).")
    eval_path: str | None = _f(None, "Optional evaluation file (same format).")
    eval_fraction: float = _f(0.0, "Fraction of the training records held out for evaluation when eval_path is unset.")
    seq_len: int = _f(512, "Tokens per sequence (packed sequences are filled up to this length).")
    pack: bool = _f(True, "Pack several samples into one sequence (no attention across samples).")
    response_only: bool | None = _f(None, "Loss on responses only; default: true for alpaca/messages/sharegpt, false for text.")
    text_field: str = _f("text", "Field holding the text for the text format.")
    fields: dict[str, str] = _f({}, "Rename record keys for the format, e.g. {instruction: question, output: answer}; targets: instruction, input, output, text, messages, conversations.")
    shuffle: bool = _f(True, "Shuffle samples each epoch (seeded by train.seed).")


@dataclass
class LoraConfig:
    rank: int = _f(16, "LoRA rank r.")
    alpha: float = _f(32.0, "LoRA alpha (scale = alpha / rank).")
    dropout: float = _f(0.0, "Dropout on the LoRA input.")
    targets: list[str] | str = _f("auto", "Module names to adapt, e.g. [q_proj, v_proj]; auto = the architecture's default (attention + dense MLP).")
    target_parameters: list[str] = _f([], "Fused parameters to adapt, e.g. [experts.gate_up_proj, experts.down_proj].")


@dataclass
class MemoryConfig:
    gpu_budget: str | None = _f(None, "GPU memory the run may use, e.g. 24GiB; default: what the card has free.")
    host_budget: str | None = _f(None, "Host RAM the run may use, e.g. 64GiB; default: what the machine has.")
    codec: str = _f("bf16", "Storage/transfer codec of frozen base weights: bf16, int8 or nf4.")
    stream: str = _f("auto", "Decoder layers streamed from host RAM: auto (the plan decides), all, none (resident).")
    ring_slots: int = _f(2, "GPU slots for streamed layers (>= 1).")
    prefetch: int = _f(1, "Layers copied ahead of the one computing (>= 0; capped by ring_slots - 1).")
    gradient_checkpointing: bool = _f(True, "Recompute each decoder layer in the backward instead of keeping its activations.")
    gpu_budgets: list[str] = _f([], "With train.devices: GPU memory per device, e.g. [24GiB, 16GiB] (each device's "
                                "allocator is capped to it); default: what each card has free.")
    layer_split: str = _f("auto", "With train.devices: the first decoder layer of each device after the first, e.g. 14 "
                          "(two devices) or 10,20 (three); auto: on CUDA the planner's fastest split of two GPUs that "
                          "fits memory.gpu_budgets, on cpu an even split.")
    cache_dir: str | None = _f(None, "Directory caching the packed (encoded) layers of a checkpoint directory, so the next run skips reading the shards and encoding; keyed by the checkpoint files, codec and dtype.")


@dataclass
class TrainConfig:
    max_steps: int = _f(100, "Optimizer steps.")
    lr: float = _f(2e-4, "Peak learning rate.")
    min_lr_ratio: float = _f(0.1, "Cosine schedule floor as a fraction of lr.")
    warmup_steps: int = _f(10, "Linear warmup steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    batch_size: int = _f(1, "Sequences per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    loss_chunk_tokens: int = _f(1024, "Tokens per chunk of the LM-head loss (bounds the fp32 logits).")
    eval_every: int = _f(0, "Evaluate every N steps (0: only at the end when there is eval data).")
    eval_batches: int = _f(8, "Batches per evaluation.")
    save_every: int = _f(0, "Checkpoint every N steps (0: only at the end).")
    gc_every_steps: int = _f(50, "Python garbage collection between steps: after the first step, freeze what "
                                 "exists, turn automatic collection off and collect what is not frozen every "
                                 "N steps (a collection inside a host-bound step adds to it); 0: Python's "
                                 "automatic collection.")
    overlap_grad_reduce: bool = _f(False, "Data parallel (torchrun): sum the gradients over ranks in buckets "
                                   "while the step's last backward runs, instead of in one all-reduce after it.")
    dist_backend: str = _f("auto", "Data parallel (torchrun): the collectives' backend. auto: NCCL on CUDA, gloo on "
                           "the CPU; nccl; gloo: on CUDA too, the ranks load no NCCL (less host RAM: the second rank "
                           "added 1.5 GB instead of 2.3) and one host's ranks sum gradients through shared pinned "
                           "memory (74 MB in 10 ms).")
    keep_checkpoints: int = _f(0, "Checkpoints kept: the newest N plus the best eval one (0: keep all).")
    seed: int = _f(0, "Seed of data order, LoRA init and dropout.")
    device: str = _f("auto", "auto (cuda when available), cpu or cuda.")
    devices: list[str] = _f([], "Layer split in one process (no torchrun), e.g. [cuda:0, cuda:1]: device d computes a "
                            "contiguous range of decoder layers (memory.layer_split) with its own resident and streamed "
                            "layers (memory.gpu_budgets); the first also holds embeddings, LM head and loss. The GPUs "
                            "work one after the other; `streamtune plan --gpu A,B` says when it beats data parallel. "
                            "Empty: one device (train.device).")
    kernels: str = _f("auto", "auto: fast kernels where the device supports them (bf16 LoRA products, fused "
                      "soft-capped linear+CE, FlexAttention on CUDA, expert LoRA as grouped low-rank products, "
                      "fused RMSNorm and gated activation on CUDA, routed MoE experts on CUDA sm80+, heads wider "
                      "than 256 as row-chunked GEMMs from 4096 tokens on CUDA sm80+); eager: the stock HF/PEFT "
                      "path.")
    compile_layers: bool | None = _f(None, "Compile each decoder layer's forward (torch.compile, shared by all "
                                     "layers; needs train.kernels=auto). Default (empty or auto): on for CUDA sm80+ "
                                     "(measured on an H200, 26B preset, int8, 2048 tokens: 0.61 -> 0.34 s per "
                                     "step; the first step also compiles, 28 s there with a warm compile cache), "
                                     "off on the CPU (compiling there takes minutes); true/false force it.")


@dataclass
class OutputConfig:
    dir: str = _f("runs/run", "Run directory: config.yaml, metrics.jsonl, adapter/, checkpoints/.")
    tensorboard: bool = _f(False, "Also write TensorBoard logs under DIR/tensorboard.")
    overwrite: bool = _f(False, "Allow a new run in a directory that already holds one.")
    progress: bool = _f(True, "Show a progress bar (one line per N steps when stderr is not a terminal).")
    wandb: str | None = _f(None, "Weights & Biases project to log to (needs the wandb package); default: off.")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step at full packing: batch_size * seq_len * grad_accum."""
        return self.train.batch_size * self.data.seq_len * self.train.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
_SECTION_CLASSES = {
    "model": ModelConfig, "data": DataConfig, "lora": LoraConfig,
    "memory": MemoryConfig, "train": TrainConfig, "output": OutputConfig,
}


def help_lines() -> list[str]:
    """One line per config key with its default and help text (for ``--help``)."""
    lines = []
    for section, cls in _SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{section}.{f.name} (default {default!r}): {f.metadata.get('help', '')}")
    return lines


def _coerce(key: str, value: Any, f: dataclasses.Field, problems: list[str]) -> Any:
    """Coerce a YAML/CLI value to the field's declared type; record a problem when impossible."""
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        problems.append(f"{key}: must not be empty")
        return f.default
    if kind.startswith("list") and isinstance(value, str) and "str" not in kind.replace("list[str]", ""):
        value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        if kind.startswith("bool"):
            if isinstance(value, str) and "None" in kind and value.lower() == "auto":
                return None  # an optional switch's default: decided where it runs
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): v for k, v in value.items()}
        if kind.startswith("list[str] | str"):
            if isinstance(value, (list, tuple)):
                return [str(v) for v in value]
            return str(value)
        if kind.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [str(v) for v in value]
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        allowed = {"bool": "true or false", "bool | None": "true, false or auto (empty)"}.get(kind, f"a valid {kind}")
        problems.append(f"{key}: {value!r} is not {allowed}")
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts, validating everything.

    Raises:
        ConfigError: listing every unknown key, wrong type and out-of-range value.
    """
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: expected a mapping of sections {list(_SECTION_CLASSES)}, got {type(raw).__name__}"])
    sections = {}
    for name in raw:
        if name not in _SECTION_CLASSES:
            problems.append(f"{name}: unknown section{did_you_mean(name, _SECTION_CLASSES)}; "
                            f"allowed: {', '.join(_SECTION_CLASSES)}")
    for name, cls in _SECTION_CLASSES.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            problems.append(f"{name}: expected a mapping of keys, got {values!r}")
            values = {}
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in by_name:
                problems.append(f"{name}.{key}: unknown key{_suggest_key(name, key)}; allowed: {', '.join(by_name)}")
                continue
            kwargs[key] = _coerce(f"{name}.{key}", value, by_name[key], problems)
        sections[name] = cls(**kwargs)
    cfg = RunConfig(**sections)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def did_you_mean(word: str, options: Any) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``options`` to ``word``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def all_keys() -> list[str]:
    """Every dotted config key, ``model.name`` ... ``output.progress``."""
    return [f"{section}.{f.name}" for section, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)]


def _suggest_key(section: str, key: str) -> str:
    """``" (did you mean 'memory.codec'?)"`` for a key put in the wrong section or mistyped."""
    elsewhere = [dotted for dotted in all_keys() if dotted.split(".", 1)[1] == key]
    if elsewhere:
        return f" (did you mean {elsewhere[0]!r}?)"
    same = [dotted for dotted in all_keys() if dotted.startswith(f"{section}.")]
    return did_you_mean(f"{section}.{key}", same) or did_you_mean(f"{section}.{key}", all_keys())


def _check_fields(problems: list[str], fields: dict[str, Any]) -> None:
    for target, source in fields.items():
        if target not in FIELD_TARGETS:
            problems.append(f"data.fields: unknown target {target!r}{did_you_mean(target, FIELD_TARGETS)}; "
                            f"allowed: {', '.join(FIELD_TARGETS)} (write target: record_key)")
        if not isinstance(source, str) or not source:
            problems.append(f"data.fields.{target}: {source!r} must be the name of a record key")
    sources = [s for s in fields.values() if isinstance(s, str)]
    for source in sorted({s for s in sources if sources.count(s) > 1}):
        problems.append(f"data.fields: record key {source!r} is mapped to several targets; map it once")


def _check_choice(problems: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{key}: {value!r} is not allowed{did_you_mean(value, allowed)}; allowed: {', '.join(allowed)}")


def _check_min(problems: list[str], key: str, value: float, minimum: float) -> None:
    if value < minimum:
        problems.append(f"{key}: {value!r} must be >= {minimum}")


def validate(cfg: RunConfig) -> list[str]:
    """Return every problem of a config (empty when valid). Does not touch the file system."""
    p: list[str] = []
    _check_choice(p, "model.dtype", cfg.model.dtype, DTYPES)
    if not cfg.model.name:
        p.append("model.name: required; a local HF checkpoint directory or a preset such as tiny-gemma4")
    if not cfg.data.path:
        p.append("data.path: required; a .jsonl or .parquet file")
    _check_choice(p, "data.format", cfg.data.format, FORMATS)
    _check_min(p, "data.seq_len", cfg.data.seq_len, 8)
    _check_fields(p, cfg.data.fields)
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        p.append(f"data.eval_fraction: {cfg.data.eval_fraction} must be in [0, 1)")
    _check_min(p, "lora.rank", cfg.lora.rank, 1)
    _check_min(p, "lora.alpha", cfg.lora.alpha, 0.0)
    if not 0.0 <= cfg.lora.dropout < 1.0:
        p.append(f"lora.dropout: {cfg.lora.dropout} must be in [0, 1)")
    if cfg.lora.dropout and cfg.lora.target_parameters:
        p.append("lora.dropout: must be 0 with lora.target_parameters (PEFT cannot apply dropout to fused parameters)")
    if isinstance(cfg.lora.targets, str) and cfg.lora.targets != "auto":
        p.append(f"lora.targets: {cfg.lora.targets!r}: use 'auto' or a list of module names such as [q_proj, v_proj]")
    if isinstance(cfg.lora.targets, list) and not cfg.lora.targets and not cfg.lora.target_parameters:
        p.append("lora.targets: empty list adapts nothing; give module names or 'auto'")
    for key in ("gpu_budget", "host_budget"):
        value = getattr(cfg.memory, key)
        if value is not None:
            try:
                if parse_bytes(value) <= 0:
                    raise ValueError(f"{value!r} must be positive")
            except ValueError as exc:
                p.append(f"memory.{key}: {exc}")
    _check_choice(p, "memory.codec", cfg.memory.codec, CODECS)
    _check_choice(p, "memory.stream", cfg.memory.stream, STREAM_MODES)
    _check_min(p, "memory.ring_slots", cfg.memory.ring_slots, 1)
    _check_min(p, "memory.prefetch", cfg.memory.prefetch, 0)
    t = cfg.train
    for key, minimum in (("max_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("loss_chunk_tokens", 1),
                         ("warmup_steps", 0), ("eval_every", 0), ("save_every", 0), ("keep_checkpoints", 0),
                         ("eval_batches", 1), ("gc_every_steps", 0),
                         ("lr", 0.0), ("weight_decay", 0.0), ("max_grad_norm", 0.0)):
        _check_min(p, f"train.{key}", getattr(t, key), minimum)
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        p.append(f"train.min_lr_ratio: {t.min_lr_ratio} must be in [0, 1]")
    _check_choice(p, "train.device", t.device, DEVICES)
    p += check_layer_split(cfg)
    _check_choice(p, "train.kernels", t.kernels, KERNEL_MODES)
    _check_choice(p, "train.dist_backend", t.dist_backend, DIST_BACKENDS)
    if t.dist_backend == "nccl" and t.device == "cpu":
        p.append("train.dist_backend: nccl needs train.device cuda or auto (NCCL reduces on GPUs); use gloo or auto")
    if t.compile_layers and t.kernels == "eager":
        p.append("train.compile_layers: true needs train.kernels=auto (eager is the stock path); "
                 "set train.kernels=auto or train.compile_layers=false")
    if not cfg.output.dir:
        p.append("output.dir: required; the run directory")
    return p


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turn ``["train.lr=1e-4", "lora.targets=[q_proj,v_proj]"]`` into nested dicts.

    Values are parsed as YAML scalars/lists. Returns the nested dict and the malformed items.
    """
    nested: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            guess = [dotted for dotted in all_keys() if dotted.split(".", 1)[1] == key.strip()] if sep else []
            hint = f" (did you mean {guess[0]}={text}?)" if guess else ""
            problems.append(f"{item}: overrides look like section.key=value, e.g. train.lr=1e-4{hint}")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested, problems


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config, apply dotted overrides, validate, and make every path absolute.

    Relative paths resolve against the current directory at launch (see :func:`absolute_paths`);
    a relative ``data.path``/``data.eval_path`` that does not exist there but does beside the YAML
    file resolves against the YAML file's directory, so an example config runs from any directory.

    Raises:
        ConfigError: the file is missing or not YAML, or any key is invalid (all listed at once).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config: file {str(path)!r} does not exist; pass a YAML file such as examples/quickstart.yaml"])
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"config: {path} is not valid YAML: {exc}"]) from exc
        if isinstance(raw, dict):
            _resolve_relative(raw, path.parent)
    nested, problems = parse_overrides(overrides or [])
    if problems:
        raise ConfigError(problems)
    if not isinstance(raw, dict):
        raise ConfigError([f"config: {path} must hold a mapping of sections, got {type(raw).__name__}"])
    return absolute_paths(from_dict(_merge(raw, nested)))


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Make the paths of ``cfg`` absolute (in place; returned for chaining), against the current directory.

    ``data.path``, ``data.eval_path``, ``output.dir`` and ``memory.cache_dir`` always; ``model.name``
    and ``model.tokenizer`` only when they name an existing directory (a preset name stays a name).
    ``~`` expands. A bundled model's name (``smollm2-135m-instruct``) becomes its converted checkpoint
    directory (see :mod:`streamtune.models.bundled`; converted on first use). The run's saved ``config.yaml``
    then works from any directory (``--resume`` included).

    Raises:
        InputError: a bundled model whose package is not installed.
    """
    import os

    from streamtune.models.bundled import bundled_checkpoint, is_bundled
    from streamtune.models.presets import is_preset

    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        values = getattr(cfg, section)
        value = getattr(values, key)
        if not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        if dotted == "model.name" and is_bundled(value) and not path.exists():
            path = bundled_checkpoint(value)  # converted once, then a plain checkpoint directory
        elif section == "model" and (is_preset(value) or not path.is_dir()):
            continue
        setattr(values, key, os.path.abspath(path))
    return cfg


def _resolve_relative(raw: dict[str, Any], base_dir: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("path", "eval_path"):
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and not Path(value).exists():
            candidate = base_dir / value
            if candidate.exists():
                data[key] = str(candidate)
