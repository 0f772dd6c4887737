"""Tokenizers: the built-in tiny byte-level BPE for the tiny presets, or a checkpoint's own.

The tiny tokenizer is trained in-process (deterministically, in well under a second) on the
quickstart dataset that ships as package data, so tests and the quickstart need no download.
Its special tokens match the tiny presets: ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

from streamtune.errors import InputError

PAD_TOKEN, EOS_TOKEN, BOS_TOKEN = "<pad>", "<eos>", "<bos>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, START_OF_TURN, END_OF_TURN)
CORPUS_ASSET = "quickstart.jsonl"
TINY_PREFIX = "tiny-"

# Gemma-style turns; the assistant role is written "model" as in Gemma's own template.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _corpus_lines() -> list[str]:
    """Training text of the tiny tokenizer: every string field of the bundled dataset."""
    text = resources.files("streamtune.assets").joinpath(CORPUS_ASSET).read_text(encoding="utf-8")
    lines = []
    for raw in text.splitlines():
        if raw.strip():
            record = json.loads(raw)
            lines.extend(str(v) for v in record.values() if v)
    lines.extend(["user\n", "model\n", "system\n"] * 8)
    return lines


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from streamtune.models.presets import TINY_VOCAB_SIZE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer() -> Any:
    """The built-in tokenizer of the tiny presets (byte-level BPE, vocab <= TINY_VOCAB_SIZE).

    Trained once per process on the bundled dataset and cached; each call returns a fresh
    ``PreTrainedTokenizerFast`` (cheap), so callers may change it without affecting others.

    Returns:
        transformers.PreTrainedTokenizerFast with pad/eos/bos ids 0/1/2, ``<start_of_turn>`` and
        ``<end_of_turn>`` turn markers and a Gemma-like ``chat_template``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=BOS_TOKEN,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN],
        model_max_length=4096, padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(model_cfg: Any) -> Any:
    """The tokenizer of a run.

    ``model.tokenizer`` when set; otherwise the built-in tiny tokenizer for ``tiny-*`` presets, or
    the model directory's own tokenizer (local files only).

    Args:
        model_cfg: ``RunConfig.model`` (reads ``name``, ``tokenizer``, ``trust_remote_code``).

    Raises:
        InputError: the tokenizer directory is missing or unreadable, or a large preset has no
            tokenizer (``model.tokenizer`` must then be set).
    """
    from streamtune.models.presets import PRESETS

    name = str(model_cfg.name)
    if model_cfg.tokenizer:
        return _from_directory(str(model_cfg.tokenizer), "model.tokenizer", model_cfg)
    if name.startswith(TINY_PREFIX) and name in PRESETS:
        return build_tiny_tokenizer()
    if name in PRESETS:
        raise InputError(
            f"model.tokenizer: preset {name!r} has random weights and no tokenizer; set model.tokenizer "
            f"to a local tokenizer directory (e.g. the tokenizer of the real checkpoint)"
        )
    return _from_directory(name, "model.name", model_cfg)


def _from_directory(directory: str, key: str, model_cfg: Any) -> Any:
    path = Path(directory).expanduser()
    fix = "set model.tokenizer to a directory holding tokenizer.json (or tokenizer.model) and tokenizer_config.json"
    if not path.is_dir():
        raise InputError(f"{key}: tokenizer directory {str(path)!r} does not exist; {fix}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=bool(getattr(model_cfg, "trust_remote_code", False)),
        )
    except Exception as exc:  # transformers raises OSError/ValueError/TypeError/JSON errors here
        reason = " ".join(str(exc).split())
        raise InputError(f"{key}: could not load a tokenizer from {str(path)!r} ({type(exc).__name__}: {reason}); {fix}") from exc
    if not getattr(tokenizer, "is_fast", False) and not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise InputError(f"{key}: {str(path)!r} did not give a usable tokenizer; {fix}")
    return tokenizer
