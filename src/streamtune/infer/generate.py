"""Text generation through HF ``generate`` on the placed model (KV cache on the compute device).

Streamed decoder layers run their forward under ``no_grad`` with the cache passed through, so the
stock ``generate`` loop works on the engine unchanged: each new token streams every streamed layer
once, and the cache tensors are made on the device by the layers themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamtune.errors import InputError

# End-of-turn tokens of common chat templates: generation stops at any of them that the vocabulary has.
TURN_END_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<turn|>")


@dataclass
class SamplingOptions:
    """Decoding settings; ``temperature`` 0 means greedy (and the others are ignored)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def check(self) -> None:
        """Raises:
            InputError: a value out of range (names the flag).
        """
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens: {self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise InputError(f"--temperature: {self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"--top-p: {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise InputError(f"--top-k: {self.top_k} must be >= 0 (0 = off)")


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
    """Token ids [1, T] of a conversation: the chat template when the tokenizer has one, else the plain text.

    Raises:
        InputError: the conversation is empty.
    """
    import torch

    if not messages or not any(m.get("content") for m in messages):
        raise InputError("--prompt: empty prompt; give some text")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return torch.tensor([list(ids["input_ids"])], dtype=torch.long)
    text = "\n".join(m["content"] for m in messages)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """eos plus every end-of-turn token the tokenizer knows."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in TURN_END_TOKENS:
        if token in vocab and vocab[token] not in ids:
            ids.append(int(vocab[token]))
    return ids


def generate_ids(loaded: Any, input_ids: Any, sampling: SamplingOptions) -> Any:
    """New token ids [N] after ``input_ids`` [1, T] (stops at a stop token, which is dropped)."""
    import torch

    sampling.check()
    tokenizer = loaded.tokenizer
    stops = stop_token_ids(tokenizer)
    kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "use_cache": True,
                              "eos_token_id": stops or None,
                              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]}
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        torch.manual_seed(sampling.seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    input_ids = input_ids.to(loaded.device)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    new = out[0, input_ids.shape[1]:].cpu()
    keep = [int(t) for t in new]
    while keep and keep[-1] in stops:
        keep.pop()
    return torch.tensor(keep, dtype=torch.long)


def generate(loaded: Any, messages: list[dict[str, str]] | str, sampling: SamplingOptions | None = None) -> str:
    """The model's reply to ``messages`` (a conversation) or to a single user prompt.

    Args:
        loaded: an :class:`~streamtune.infer.session.InferenceModel`.
        messages: ``[{"role": "user", "content": ...}, ...]`` or a prompt string.
        sampling: decoding settings (default: greedy, 128 new tokens).

    Raises:
        InputError: empty prompt or bad sampling options.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    sampling = sampling or SamplingOptions()
    new_ids = generate_ids(loaded, prompt_ids(loaded.tokenizer, messages), sampling)
    return loaded.tokenizer.decode(new_ids.tolist(), skip_special_tokens=True)
