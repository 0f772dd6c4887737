"""Record formats (text, alpaca, messages, sharegpt): validation, rendering and response-only labels.

A record becomes ``(input_ids, labels)`` of equal length; ``labels`` is ``-100`` on tokens that
carry no loss and equals ``input_ids`` elsewhere (not shifted: the model shifts). Which tokens are
trained is decided on characters of the rendered text (spans of the responses) and mapped to
tokens through the tokenizer's offsets, so tokens merged across a prompt/response boundary are
handled without re-tokenizing pieces separately.
"""

from __future__ import annotations

from typing import Any

from streamtune.data.sources import Record
from streamtune.errors import InputError

IGNORE_INDEX = -100
FORMATS = ("text", "alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
OPTIONAL_FIELDS = ("input",)
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def detect_format(record: Record, text_field: str) -> str:
    """The format of a dataset, judged from the keys of its first record.

    Raises:
        InputError: no format matches, or more than one does (the message lists the keys found).
    """
    keys = set(record.data)
    matches = []
    if "messages" in keys:
        matches.append("messages")
    if "conversations" in keys:
        matches.append("sharegpt")
    if {"instruction", "output"} <= keys:
        matches.append("alpaca")
    if text_field in keys:
        matches.append("text")
    found = ", ".join(sorted(map(str, keys))) or "(none)"
    if not matches:
        raise InputError(
            f"data.format: auto-detection failed on {record.where}: keys found: {found}; expected 'messages' "
            f"(messages), 'conversations' (sharegpt), 'instruction' + 'output' (alpaca) or {text_field!r} (text, "
            f"see data.text_field); set data.format to one of {', '.join(FORMATS)}, or map your keys with "
            f"data.fields, e.g. {{instruction: question, output: answer}}"
        )
    if len(matches) > 1:
        raise InputError(
            f"data.format: {record.where} fits several formats ({', '.join(matches)}; keys found: {found}); "
            f"set data.format to one of them"
        )
    return matches[0]


def _string_field(record: Record, name: str, required: bool = True, allow_empty: bool = False) -> str:
    value = record.data.get(name)
    if value is None and not required:
        return ""
    if name not in record.data:
        raise InputError(f"{record.where}: missing field {name!r} (keys found: {', '.join(map(str, record.data)) or '(none)'})")
    if not isinstance(value, str):
        raise InputError(f"{record.where}: field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InputError(f"{record.where}: field {name!r} is empty")
    return value


def _messages(record: Record) -> list[dict[str, str]]:
    if "messages" not in record.data:
        raise InputError(f"{record.where}: missing field 'messages' (keys found: {', '.join(map(str, record.data))})")
    messages = record.data["messages"]
    if not isinstance(messages, list):
        raise InputError(f"{record.where}: field 'messages' must be a list of {{role, content}}, got {type(messages).__name__}")
    if not messages:
        raise InputError(f"{record.where}: field 'messages' is empty; give at least a user and an assistant turn")
    out = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InputError(f"{record.where}: field {field} must be an object {{role, content}}, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(f"{record.where}: field {field}.role is {role!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"{record.where}: field {field}.content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _sharegpt_messages(record: Record) -> list[dict[str, str]]:
    """The ``conversations`` of a ShareGPT record (``from``/``value`` turns) as chat messages."""
    turns = record.data.get("conversations")
    if not isinstance(turns, list):
        what = "missing" if "conversations" not in record.data else f"a {type(turns).__name__}"
        raise InputError(f"{record.where}: field 'conversations' must be a list of {{from, value}} turns, got {what}")
    if not turns:
        raise InputError(f"{record.where}: field 'conversations' is empty; give at least a human and a gpt turn")
    out = []
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise InputError(f"{record.where}: field {field} must be an object {{from, value}}, got {type(turn).__name__}")
        speaker = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if speaker not in SHAREGPT_ROLES:
            raise InputError(f"{record.where}: field {field}.from is {speaker!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(value, str):
            raise InputError(f"{record.where}: field {field}.value must be a string, got {type(value).__name__}")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return out


def chat_messages(record: Record, fmt: str) -> list[dict[str, str]]:
    """The chat messages of a ``messages`` or ``sharegpt`` record, validated."""
    return _sharegpt_messages(record) if fmt == "sharegpt" else _messages(record)


def map_fields(records: list[Record], fields: dict[str, str], text_field: str) -> list[Record]:
    """Rename record keys as ``data.fields`` says (``{target: record_key}``); ``text`` maps to ``text_field``.

    Raises:
        InputError: a record lacks a mapped key (its file:line, the key and the target are named).
    """
    if not fields:
        return records
    out = []
    for record in records:
        data = dict(record.data)
        for target, source in fields.items():
            if source in data:
                data[text_field if target == "text" else target] = data.pop(source)
            elif target not in OPTIONAL_FIELDS:
                found = ", ".join(map(str, record.data)) or "(none)"
                raise InputError(f"{record.where}: missing field {source!r}, which data.fields maps to {target!r} "
                                 f"(keys found: {found})")
        out.append(Record(data, record.where))
    return out


def validate_record(record: Record, fmt: str, text_field: str) -> None:
    """Check one record against its format.

    Raises:
        InputError: naming ``file:line`` and the wrong field.
    """
    if fmt == "text":
        _string_field(record, text_field)
    elif fmt == "alpaca":
        _string_field(record, "instruction")
        _string_field(record, "input", required=False, allow_empty=True)
        _string_field(record, "output")
    elif fmt in ("messages", "sharegpt"):
        messages = chat_messages(record, fmt)
        if not any(m["role"] == "assistant" for m in messages):
            name = "conversations" if fmt == "sharegpt" else "messages"
            raise InputError(f"{record.where}: field {name!r} has no assistant turn; nothing to learn from")
    else:
        raise InputError(f"data.format: {fmt!r} is not allowed; allowed: auto, {', '.join(FORMATS)}")


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], where: str, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 errors (template raise_exception, undefined names, ...)
        raise InputError(f"{where}: the tokenizer's chat template failed ({type(exc).__name__}: {exc})") from exc


def render_messages(tokenizer: Any, messages: list[dict[str, str]], where: str,
                    with_spans: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """The chat text of ``messages`` and the character spans of the assistant turns.

    Each span runs from the end of the generation prompt before the turn to the end of the turn's
    rendering, found by rendering prefixes of the conversation.

    Raises:
        InputError: the tokenizer has no chat template, or its rendering of a prefix is not a
            prefix of the whole conversation (then set ``data.response_only: false``).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "data.format: messages need a tokenizer with a chat_template; set model.tokenizer to one that has it"
        )
    full = _render_chat(tokenizer, messages, where, False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if not with_spans or message["role"] != "assistant":
            continue
        start_text = _render_chat(tokenizer, messages[:i], where, True) if i else ""
        end_text = _render_chat(tokenizer, messages[: i + 1], where, False)
        if not (full.startswith(end_text) and end_text.startswith(start_text)):
            raise InputError(
                f"{where}: the chat template renders assistant turn {i} differently inside the full conversation, "
                f"so its loss span cannot be found; set data.response_only: false (loss on all tokens)"
            )
        spans.append((len(start_text), len(end_text)))
    return full, spans


def render(record: Record, fmt: str, tokenizer: Any, text_field: str,
           with_spans: bool = True) -> tuple[str, list[tuple[int, int]], bool]:
    """The text of a record, the character spans of its responses, and whether the text holds BOS.

    ``with_spans=False`` skips finding the response spans of chat renderings (returned empty).

    Alpaca records use the tokenizer's chat template when it has one (user = instruction + input),
    else the classic ``### Instruction / ### Response`` prompt.
    """
    if fmt == "text":
        text = record.data[text_field]
        return text, [(0, len(text))], False
    if fmt == "alpaca":
        instruction = record.data["instruction"]
        extra = record.data.get("input") or ""
        output = record.data["output"]
        if getattr(tokenizer, "chat_template", None):
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
            text, spans = render_messages(tokenizer, messages, record.where, with_spans)
            return text, spans, True
        template = ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=extra)
        return prompt + output, [(len(prompt), len(prompt) + len(output))], False
    text, spans = render_messages(tokenizer, chat_messages(record, fmt), record.where, with_spans)
    return text, spans, True


def _in_spans(position: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in spans)


def encode(record: Record, fmt: str, tokenizer: Any, text_field: str, response_only: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record, with BOS (when the tokenizer has one) and EOS.

    ``response_only`` keeps the loss on the response spans only; EOS is trained when the token
    before it is. Labels are not shifted.

    Raises:
        InputError: the record cannot be rendered (see :func:`render_messages`), or response-only
            labels are asked of a tokenizer without offsets (not a fast tokenizer).
    """
    if response_only and not getattr(tokenizer, "is_fast", False):
        raise InputError(
            "model.tokenizer: response-only labels need a fast (tokenizers-backed) tokenizer for token offsets; "
            "use a directory with tokenizer.json or set data.response_only: false"
        )
    text, spans, has_bos = render(record, fmt, tokenizer, text_field, with_spans=response_only)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=response_only)
    ids = list(encoded["input_ids"])
    if response_only:
        trained = [_in_spans(start, spans) for start, _ in encoded["offset_mapping"]]
    else:
        trained = [True] * len(ids)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and not has_bos and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        trained.insert(0, False)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        trained.append(bool(trained[-1]) if len(trained) > 0 else True)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, trained)]
    return ids, labels
