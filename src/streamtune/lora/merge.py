"""Merging a LoRA adapter into its base model and writing a stock HF checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from streamtune.errors import InputError
from streamtune.lora.adapter import build_base_for_adapter, peft_wrapping


def merge(adapter_dir: str | Path, out_dir: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Merge ``adapter_dir`` into its base model and save a HF checkpoint to ``out_dir``.

    The checkpoint holds ``config.json``, ``*.safetensors`` and the adapter's tokenizer, and
    loads with ``AutoModelForCausalLM.from_pretrained(out_dir)``.

    Args:
        adapter_dir: a PEFT adapter directory (``streamtune train`` writes ``RUN/adapter``).
        out_dir: where the merged checkpoint goes (written to a temp dir, then renamed).
        dtype: dtype of the merged weights; default: the dtype the run trained in.
        overwrite: replace an existing non-empty ``out_dir``.

    Raises:
        InputError: not an adapter directory, base model not found, or ``out_dir`` not empty.
    """
    from peft import PeftModel

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"--out: {str(out_dir)!r} exists and is not empty; pick a new directory or pass --overwrite")
    base, _ = build_base_for_adapter(adapter_dir, dtype)
    with peft_wrapping():
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = peft_model.merge_and_unload()
    tmp_dir = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    merged.save_pretrained(str(tmp_dir))
    _copy_tokenizer(adapter_dir, tmp_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_dir, out_dir)
    return out_dir


def _copy_tokenizer(adapter_dir: Path, out_dir: Path) -> Any:
    if not (adapter_dir / "tokenizer_config.json").is_file() and not (adapter_dir / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
