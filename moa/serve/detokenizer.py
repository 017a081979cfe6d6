"""Incremental detokenizing for the engine: one request's text as its tokens arrive, and its stop strings.

Only the tokens since the last complete character are decoded again (as vLLM does), so a step costs
the same however long the output is, and a character split over byte tokens comes out whole: text
ending in a partial character (U+FFFD) is held back, as is text that may begin a stop string.
"""
from __future__ import annotations

import functools


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""  # decoded text of tokens[:read_offset]
        self.prefix_offset = self.read_offset = 0  # tokens[prefix_offset:read_offset] decode to the end of `text`
        self.emitted = 0  # characters sent
        self.length = 0  # characters of the text so far: where the next token's text starts

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def full_text(self) -> str:
        """The text of every token so far (a partial last character included)."""
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        window = self._decode(self.tokens[self.prefix_offset:])
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            self.text += window[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return self.text
        return self.text + window[len(prefix):]

    def add(self, token: int, final: bool = False) -> tuple[str, bool]:
        """Append one token: (the new text to send now, whether a stop string ended the text). With
        `final` (the request ends at this token) everything left is sent."""
        self.tokens.append(token)
        text = self.full_text()
        self.length = len(text)
        start = self.emitted
        hits = [i for i in (text.find(s, max(0, start - len(s))) for s in self.stop) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        elif final:
            end, stopped = len(text), False
        else:
            end, stopped = len(text) - held_back(text, self.stop), False
        delta = text[start:max(end, start)]
        self.emitted += len(delta)
        return delta, stopped


def held_back(text: str, stops) -> int:
    """Characters at the end of `text` not to send yet: a partial character, or the start of a stop string."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def text_offsets(tokenizer, tokens: list[int]) -> tuple[str, list[int]]:
    """(the text of `tokens`, where each token's text starts in it), decoded incrementally."""
    detok, offsets = Detokenizer(tokenizer), []
    for token in tokens:
        offsets.append(detok.length)
        detok.add(token)
    return detok.full_text(), offsets


class TokenStrings:
    """Each token id's own text (for logprobs), decoded once."""

    def __init__(self, tokenizer):
        self.get = functools.lru_cache(maxsize=1 << 16)(lambda token: tokenizer.decode([token]))
