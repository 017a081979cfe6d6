"""Turn a row into token ids with the loss on the response only.

With a chat template, the prompt is a single user turn rendered with the generation prompt and
the response is what the template adds for the assistant turn. Without one, the plain format is

    User: <prompt>\\n
    Assistant: <response><eos>

(the tokenizer's BOS, if it has one, goes first). Labels are -100 on every prompt token.
"""
from __future__ import annotations

from moa.errors import UsageError

PLAIN_PROMPT = "User: {prompt}\nAssistant: "
IGNORE_INDEX = -100


def format_prompt(tokenizer, prompt: str) -> str:
    """The text a model sees before it writes the response."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return PLAIN_PROMPT.format(prompt=prompt)


def _response_text(tokenizer, prompt: str, response: str, prompt_text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(prompt_text):
            return full[len(prompt_text):]
    return response


def padding_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos token."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    raise UsageError(f"{type(tokenizer).__name__} has neither a pad nor an eos token to pad batches with")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the formatted prompt (BOS first in the plain format when the tokenizer has one)."""
    ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if not getattr(tokenizer, "chat_template", None) and bos is not None:
        ids = [bos] + ids
    return ids


def encode_example(tokenizer, row: dict, max_length: int) -> dict:
    """`{"input_ids", "labels"}` for one row; labels are -100 on prompt tokens.

    Sequences longer than `max_length` keep the response (up to half of `max_length` when the
    prompt needs the rest) and the end of the prompt.
    """
    if max_length < 2:
        raise UsageError(f"max_length must be at least 2, got {max_length}")
    for name in ("prompt", "response"):
        if not isinstance(row.get(name), str):
            raise UsageError(f"row field {name!r} must be a string, got {row.get(name)!r}")
    prompt_text = format_prompt(tokenizer, row["prompt"])
    prompt_ids = encode_prompt(tokenizer, row["prompt"])
    response_text = _response_text(tokenizer, row["prompt"], row["response"], prompt_text)
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in response_ids[-2:]:
        response_ids = response_ids + [eos]
    if len(prompt_ids) + len(response_ids) > max_length:
        response_ids = response_ids[:max(max_length - len(prompt_ids), max_length // 2)]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(response_ids)):]
    return {"input_ids": prompt_ids + response_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)}
