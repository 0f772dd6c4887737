import pytest

from streamtune.data import build_data
from streamtune.data.formats import IGNORE_INDEX, encode
from streamtune.data.sources import Record
from streamtune.errors import InputError

ALPACA = {"instruction": "Reverse the order of the words.", "input": "red fox", "output": "fox red"}
CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8."},
]}


def trained_spans(tok, ids, labels):
    """Decoded runs of consecutive trained tokens."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    return spans


def test_text_format_full_loss(tok):
    ids, labels = encode(Record({"body": "hello world"}, "f:1"), "text", tok, "body", response_only=False)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1]) == "hello world"
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]


def test_alpaca_response_only(tok):
    ids, labels = encode(Record(ALPACA, "f:1"), "alpaca", tok, "text", response_only=True)
    assert trained_spans(tok, ids, labels) == ["fox red<end_of_turn>\n<eos>"]
    assert tok.decode(ids).startswith("<bos><start_of_turn>user\nReverse the order of the words.\n\nred fox<end_of_turn>")
    _, full = encode(Record(ALPACA, "f:1"), "alpaca", tok, "text", response_only=False)
    assert sum(x != IGNORE_INDEX for x in full) == len(ids)


def test_alpaca_without_chat_template(tok):
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    assert not plain.chat_template
    ids, labels = encode(Record(ALPACA, "f:1"), "alpaca", plain, "text", response_only=True)
    assert tok.decode(ids) == "<bos>### Instruction:\nReverse the order of the words.\n\n### Input:\nred fox\n\n### Response:\nfox red<eos>"
    assert trained_spans(tok, ids, labels) == ["fox red<eos>"]


def test_messages_loss_on_assistant_turns_only(tok):
    ids, labels = encode(Record(CHAT, "f:1"), "messages", tok, "text", response_only=True)
    assert trained_spans(tok, ids, labels) == ["2 + 3 = 5.<end_of_turn>\n", "4 + 4 = 8.<end_of_turn>\n<eos>"]
    assert tok.decode(ids) == tok.apply_chat_template(CHAT["messages"], tokenize=False) + "<eos>"


def test_messages_ending_with_user_turn_trains_no_eos(tok):
    record = Record({"messages": CHAT["messages"][:4]}, "f:1")
    ids, labels = encode(record, "messages", tok, "text", response_only=True)
    assert ids[-1] == tok.eos_token_id and labels[-1] == IGNORE_INDEX
    assert trained_spans(tok, ids, labels) == ["2 + 3 = 5.<end_of_turn>\n"]


def test_template_that_is_not_prefix_stable(tok):
    odd = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    odd.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if loop.last %} [n={{ messages | length }}]{% endif %}\n{% endfor %}")
    with pytest.raises(InputError, match=r"f:7: the chat template renders assistant turn 2 .*data\.response_only: false"):
        encode(Record(CHAT, "f:7"), "messages", odd, "text", response_only=True)
    ids, labels = encode(Record(CHAT, "f:7"), "messages", odd, "text", response_only=False)
    assert labels == ids


@pytest.mark.parametrize("record, fmt", [
    ({"text": "hi"}, "text"), (ALPACA, "alpaca"), (CHAT, "messages"),
    ({"instruction": "x", "output": "y"}, "alpaca"),
])
def test_auto_detect(tmp_path, tok, write_jsonl, data_cfg, record, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [record, record])
    _, _, stats = build_data(data_cfg(path), tok, 1, 0)
    assert stats.format == fmt and stats.response_only == (fmt != "text")


def test_auto_detect_custom_text_field(tmp_path, tok, write_jsonl, data_cfg):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "some text"}])
    _, _, stats = build_data(data_cfg(path, text_field="body"), tok, 1, 0)
    assert stats.format == "text" and stats.num_trained_tokens == stats.num_tokens - 1


def test_auto_detect_unknown_and_ambiguous(tmp_path, tok, write_jsonl, data_cfg):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(InputError, match=r"data\.format: auto-detection failed on .*d\.jsonl:1: keys found: completion, prompt; .*text, alpaca, messages"):
        build_data(data_cfg(path), tok, 1, 0)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "messages": []}])
    with pytest.raises(InputError, match=r"data\.format: .*d\.jsonl:1 fits several formats \(messages, text; keys found: messages, text\)"):
        build_data(data_cfg(path), tok, 1, 0)


def test_response_only_override(tmp_path, tok, write_jsonl, data_cfg):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA])
    _, _, default = build_data(data_cfg(path), tok, 1, 0)
    _, _, full = build_data(data_cfg(path, response_only=False), tok, 1, 0)
    assert default.response_only and not full.response_only
    assert default.num_trained_tokens < full.num_trained_tokens == full.num_tokens


def test_no_trained_token_is_an_error(tmp_path, tok, write_jsonl, data_cfg):
    long_prompt = {"instruction": " ".join(["word"] * 40), "input": "", "output": "yes"}
    path = write_jsonl(tmp_path / "d.jsonl", [long_prompt])
    with pytest.raises(InputError, match=r"data\.path: no token of .* carries loss .*data\.seq_len=16"):
        build_data(data_cfg(path, seq_len=16), tok, 1, 0)
    _, _, stats = build_data(data_cfg(path, seq_len=16, response_only=False), tok, 1, 0)
    assert stats.num_truncated == 1 and stats.num_tokens == 16


BAD_RECORDS = [
    ("alpaca", {"instruction": "x"}, r"d\.jsonl:2: missing field 'output' \(keys found: instruction\)"),
    ("alpaca", {"instruction": 3, "output": "y"}, r"d\.jsonl:2: field 'instruction' must be a string, got int"),
    ("alpaca", {"instruction": "x", "input": ["a"], "output": "y"}, r"d\.jsonl:2: field 'input' must be a string, got list"),
    ("alpaca", {"instruction": "x", "output": "  "}, r"d\.jsonl:2: field 'output' is empty"),
    ("text", {"text": None}, r"d\.jsonl:2: field 'text' must be a string, got NoneType"),
    ("text", {"txt": "a"}, r"d\.jsonl:2: missing field 'text'"),
    ("messages", {"messages": []}, r"d\.jsonl:2: field 'messages' is empty"),
    ("messages", {"messages": "hi"}, r"d\.jsonl:2: field 'messages' must be a list"),
    ("messages", {"messages": ["hi"]}, r"d\.jsonl:2: field messages\[0\] must be an object"),
    ("messages", {"messages": [{"role": "bot", "content": "x"}]},
     r"d\.jsonl:2: field messages\[0\]\.role is 'bot'; allowed roles: system, user, assistant"),
    ("messages", {"messages": [{"role": "user", "content": 1}]}, r"d\.jsonl:2: field messages\[0\]\.content must be a string"),
    ("messages", {"messages": [{"role": "user", "content": "x"}]}, r"d\.jsonl:2: field 'messages' has no assistant turn"),
]


@pytest.mark.parametrize("fmt, bad, expected", BAD_RECORDS)
def test_bad_record_names_file_line_and_field(tmp_path, tok, write_jsonl, data_cfg, fmt, bad, expected):
    good = {"text": {"text": "ok"}, "alpaca": ALPACA, "messages": CHAT}[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad, good])
    with pytest.raises(InputError, match=expected):
        build_data(data_cfg(path, format=fmt), tok, 1, 0)


def test_bad_eval_record_fails_before_training(tmp_path, tok, write_jsonl, data_cfg):
    train = write_jsonl(tmp_path / "train.jsonl", [ALPACA])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [ALPACA, {"instruction": "x", "output": 1}])
    with pytest.raises(InputError, match=r"eval\.jsonl:2: field 'output' must be a string"):
        build_data(data_cfg(train, eval_path=str(evaluation)), tok, 1, 0)


def test_messages_need_a_chat_template(tmp_path, tok, write_jsonl, data_cfg):
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT])
    with pytest.raises(InputError, match=r"data\.format: messages need a tokenizer with a chat_template; set model\.tokenizer"):
        build_data(data_cfg(path), plain, 1, 0)
