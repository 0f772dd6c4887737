"""The adapter's README.md: a model card saying what was trained, on what, how, and how well."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from streamtune.train.metrics import read_metrics


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("streamtune", "__main__.py")):
        argv[0] = "streamtune"
    return " ".join(shlex.quote(a) for a in argv)


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def _num(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


def model_card(run_dir: Path, cfg: Any, base_info: dict[str, Any], step: int | None = None) -> str:
    """The card's Markdown (PEFT-style YAML header, then what a reader needs to reuse the adapter)."""
    records = [r for r in read_metrics(run_dir) if step is None or r.get("step", 0) <= step]
    steps = records[-1]["step"] if records else 0
    lora, data, train = cfg.lora, cfg.data, cfg.train
    targets = lora.targets if isinstance(lora.targets, str) else ", ".join(lora.targets)
    base = base_info.get("model_name", cfg.model.name)
    kind = f"preset, random weights of seed {base_info.get('seed', 0)}" if base_info.get("preset") else "checkpoint"
    lines = [
        "---", f"base_model: {base}", "library_name: peft", "tags:", "- lora", "- streamtune", "---", "",
        f"# LoRA adapter for {Path(str(base)).name}", "",
        f"Trained with streamtune: {steps} of {train.max_steps} optimizer steps.", "",
        "| | |", "|---|---|",
        f"| base model | `{base}` ({kind}, {base_info.get('dtype', '')}, frozen weights stored as {base_info.get('codec', cfg.memory.codec)}) |",
        f"| data | `{data.path}` (format {data.format}, seq_len {data.seq_len}, packing {'on' if data.pack else 'off'}) |",
        f"| eval data | `{data.eval_path}` |" if data.eval_path else f"| eval data | {data.eval_fraction:.0%} of the training records held out |",
        f"| steps | {steps} (batch {train.batch_size} x accumulation {train.grad_accum}, lr {train.lr:g}) |",
        f"| final train loss | {_num(_last(records, 'loss'))} |",
        f"| final eval loss | {_num(_last(records, 'eval_loss'))} |",
        f"| LoRA | rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, targets {targets}"
        + (f", target parameters {', '.join(lora.target_parameters)}" if lora.target_parameters else "") + " |",
        "", "## Made by", "", "```bash", _command(), "```", "",
        "## Use", "", "```bash", "streamtune generate THIS_DIRECTORY --prompt 'Hello'",
        "streamtune merge THIS_DIRECTORY --out merged/", "```", "",
        "or with stock PEFT: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), THIS_DIRECTORY)`.", "",
    ]
    return "\n".join(lines)


def write_model_card(adapter_dir: Path, run_dir: Path, cfg: Any, base_info: dict[str, Any], step: int | None = None) -> None:
    """Replace PEFT's empty README.md template in ``adapter_dir`` with :func:`model_card`."""
    (Path(adapter_dir) / "README.md").write_text(model_card(Path(run_dir), cfg, base_info, step), encoding="utf-8")
