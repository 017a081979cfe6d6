"""Sampling parameters, checked and normalised in one place for `moa generate` and `moa serve`.

`SamplingParams(...)` refuses a value outside its range with `SamplingError` (a ValueError naming the
field, `.param`) and normalises the rest: a temperature below `GREEDY_BELOW` is greedy (0.0), as in
vLLM, so no temperature can overflow the softmax. Ranges follow OpenAI's API reference: temperature
in [0, 2], top_p in (0, 1], presence and frequency penalties in [-2, 2], logit_bias values in
[-100, 100], logprobs in [0, MAX_LOGPROBS].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5  # a temperature below this is greedy
MAX_LOGPROBS = 20  # the most top entries per token a request may ask for
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string


class SamplingError(ValueError):
    """A sampling parameter outside its range; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def short(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: error messages never echo a long value whole."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise SamplingError(name, f"'{name}' must be a number in [{low:g}, {high:g}], got {short(value)}")
    return float(value)


def _count(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise SamplingError(name, f"'{name}' must be an integer {bound}, got {short(value)}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens; 0: nothing is generated (the prompt alone is read, e.g. scored)
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) is greedy
    top_p: float = 1.0
    seed: int | None = None  # the request's own random stream (None: a random seed)
    stop: tuple[str, ...] = ()  # stop strings: the text before the first one is returned
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # per new token: its logprob and this many top entries (None: none)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (None: none)
    vocab_size: int | None = field(default=None, compare=False)  # checks logit_bias token ids when given

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        put("temperature", _number("temperature", self.temperature, 0.0, 2.0))
        if self.temperature < GREEDY_BELOW:
            put("temperature", 0.0)
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise SamplingError("top_p", f"'top_p' must be a number in (0, 1], got {short(top_p)}")
        put("top_p", float(top_p))
        for name in ("presence_penalty", "frequency_penalty"):
            put(name, _number(name, getattr(self, name), -2.0, 2.0))
        if self.seed is not None:
            _count("seed", self.seed, -(2 ** 63), 2 ** 64 - 1)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _count(name, getattr(self, name), 0, MAX_LOGPROBS)
        _count("max_tokens", self.max_tokens, 0)
        stop = self.stop
        if not isinstance(stop, tuple) or len(stop) > MAX_STOP or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise SamplingError("stop", f"'stop' must be at most {MAX_STOP} non-empty strings of at most "
                                        f"{MAX_STOP_CHARS} characters, got {short(stop)}")
        bias = []
        for token, value in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0 or (
                    self.vocab_size is not None and token >= self.vocab_size):
                top = f"..{self.vocab_size - 1}" if self.vocab_size is not None else " or more"
                raise SamplingError("logit_bias", f"'logit_bias' keys must be token ids in 0{top}, got {short(token)}")
            bias.append((token, _number("logit_bias", value, -100.0, 100.0)))
        put("logit_bias", tuple(bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def generate_kwargs(self) -> dict:
        """transformers `generate` keyword arguments for temperature and top_p."""
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
