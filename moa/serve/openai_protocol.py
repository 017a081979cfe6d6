"""The OpenAI request bodies `moa serve` accepts, checked and turned into engine requests, apart from the engine.

`parse_completion(body, ...)` and `parse_chat(body, ...)` return a `ParsedRequest`: the prompts' token
ids, the sampling parameters (moa.infer.sampling: one set of checks for the server and `moa
generate`) and what the response must carry. Every field is either used or refused with `ApiError`
(HTTP 400) naming it: nothing is dropped silently, and a field this server does not know is refused
too. Error messages quote at most a short prefix of a bad value.

/v1/completions: `prompt` as a string, a list of strings, a list of token ids or a list of such lists
(one choice per prompt, `n` per prompt); `echo`; `logprobs` (0..20); `n` <= `best_of`; `suffix` refused.
/v1/chat/completions: `messages` (content a string or a list of text parts), `logprobs` with
`top_logprobs`, `n`, `max_completion_tokens` (or `max_tokens`); `response_format` other than text,
`tools`, `tool_choice` and `functions` refused. Both: temperature, top_p, seed, stop, presence and
frequency penalties, logit_bias, stream with `stream_options.include_usage`, user, and `moa`: the request's
culture hint for `model: "auto"`, `{"culture_hint": a culture, "locale": a language tag}` (either or both),
with the Accept-Language header as a hint below them (moa.infer.culture_choice.request_hint).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from moa.data import format_prompt
from moa.infer.culture_choice import HintError, request_hint
from moa.infer.sampling import MAX_LOGPROBS, SamplingError, SamplingParams, short

SPECIAL_MODELS = ("auto", "base")
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_CHOICES = 16  # n and best_of at most
MAX_PROMPTS = 64  # prompts in one /v1/completions request
SHARED = ("model", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias",
          "stream", "stream_options", "user", "n", "max_tokens", "moa")
MOA_FIELDS = ("culture_hint", "locale")  # the keys of the body's `moa` object
COMPLETION_FIELDS = frozenset(SHARED + ("prompt", "echo", "logprobs", "best_of", "suffix"))
CHAT_FIELDS = frozenset(SHARED + ("messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
                                  "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"))
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 502: "upstream_error",
                503: "service_unavailable_error", 504: "upstream_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what `echo` returns: the prompt as given (token ids decoded)


@dataclass
class ParsedRequest:
    chat: bool
    model: str
    prompts: list[Prompt]
    params: SamplingParams  # of each choice (seeds: seed + choice index)
    n: int  # choices returned per prompt
    best_of: int  # choices generated per prompt (the n with the highest logprob are returned)
    echo: bool
    logprobs: int | None  # top entries per token in the response (chat: top_logprobs), None: no logprobs
    stream: bool
    include_usage: bool
    hint: str | None = None  # the culture the request hints at (for "auto": used when the router abstains)

    def choice_params(self, choice: int) -> SamplingParams:
        """The sampling parameters of choice `choice` of a prompt: its own seed where one was given."""
        p = self.params
        if p.seed is None or choice == 0:
            return p
        return replace(p, seed=p.seed + choice)


def _field(body: dict, name: str, kinds, expected: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {expected}, got {short(value)}", param=name)
    return value


def check_model(body: dict, cultures: list[str]) -> str:
    model = body.get("model")
    names = list(cultures) + list(SPECIAL_MODELS)
    if not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string (a culture, 'auto' or 'base'), got {short(model)}", param="model")
    if model not in names:
        raise ApiError(404, f"unknown model {short(model)}: expected one of {names}", param="model", code="model_not_found")
    return model


def culture_hint(body: dict, cultures: list[str], accept_language: str | None) -> str | None:
    """The request's culture hint: its `moa` object's culture_hint, else its locale, else the Accept-Language header's
    (moa.infer.culture_choice.request_hint); ApiError 400 naming `moa.<key>` or the header for a hint it cannot use."""
    moa = _field(body, "moa", (dict,), f"an object with {' and/or '.join(MOA_FIELDS)}", {})
    for key in moa:
        if key not in MOA_FIELDS:
            name = f"moa.{key[:40]}"  # a JSON object's keys are strings
            raise ApiError(400, f"unsupported field '{name}': 'moa' takes {list(MOA_FIELDS)}", param=name)
    try:
        return request_hint(cultures, moa.get("culture_hint"), moa.get("locale"), accept_language)
    except HintError as e:
        if e.param == "accept_language":  # the message names the header
            raise ApiError(400, str(e), param="Accept-Language") from None
        raise ApiError(400, f"'moa.{e.param}': {e}", param=f"moa.{e.param}") from None


def _refuse_unknown(body: dict, known: frozenset) -> None:
    for name in body:
        if name not in known:
            raise ApiError(400, f"unsupported field {short(name)}: this server takes {sorted(known)}", param=name)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of them, got {short(stop)}", param="stop")
    return tuple(stops)


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    bias = _field(body, "logit_bias", (dict,), "an object mapping token ids to numbers", {})
    out = []
    for key, value in bias.items():
        if not key.isdigit():
            raise ApiError(400, f"'logit_bias' keys must be token ids, got {short(key)}", param="logit_bias")
        out.append((int(key), value))
    return tuple(out)


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _field(body, "stream", (bool,), "a boolean", False)
    options = _field(body, "stream_options", (dict,), "an object", None)
    if options is None:
        return stream, False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    unknown = set(options) - {"include_usage"}
    if unknown:
        raise ApiError(400, f"'stream_options' takes only include_usage, got {short(sorted(unknown))}", param="stream_options")
    return stream, _field(options, "include_usage", (bool,), "a boolean", False)


def completion_prompts(body: dict, tokenizer, vocab_size: int) -> list[Prompt]:
    """The prompts of a /v1/completions body: a string, a list of strings, a list of token ids or a list of them."""
    prompt = body.get("prompt")
    bad = ApiError(400, "'prompt' must be a non-empty string, a list of them, a list of token ids or a list of such "
                        f"lists, got {short(prompt)}", param="prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bad
    if len(items) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(items)} prompts: at most {MAX_PROMPTS} per request", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str) and item:
            out.append(Prompt(text_ids(tokenizer, item), item))
        elif isinstance(item, list) and item and all(_is_id(t) for t in item):
            if max(item) >= vocab_size:
                raise ApiError(400, f"'prompt' holds token id {max(item)}: expected ids in 0..{vocab_size - 1}", param="prompt")
            out.append(Prompt(list(item), tokenizer.decode(item)))
        else:
            raise bad
    return out


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def text_ids(tokenizer, text: str) -> list[int]:
    """A raw text prompt's token ids: the tokenizer's BOS first (where it has one), then the text's tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] + ids if bos is not None else ids


def chat_prompt(body: dict, tokenizer) -> Prompt:
    """The token ids of a chat's messages: through the tokenizer's chat template, else training's plain format
    (moa.data.format_prompt for the last user turn, earlier turns as 'Role: text' lines before it), so one
    user message gives moa.data.encode_prompt's ids."""
    messages = body.get("messages")
    expected = ("'messages' must be a non-empty list of {\"role\": system|developer|user|assistant, \"content\": a string "
                "or a list of {\"type\": \"text\", \"text\": ...} parts}")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"{expected}, got {short(messages)}", param="messages")
    turns = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and content and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            content = "\n".join(p["text"] for p in content)
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(content, str):
            raise ApiError(400, f"{expected}; message {i} is {short(message)}", param="messages")
        role = "system" if message["role"] == "developer" else message["role"]
        turns.append({"role": role, "content": content})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return Prompt(tokenizer(text, add_special_tokens=False)["input_ids"], text)
    if turns[-1]["role"] != "user":
        raise ApiError(400, f"the last message must be the user's (this model's prompt format ends with a user turn), "
                            f"got role {turns[-1]['role']!r}", param="messages")
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in turns[:-1])
    text += format_prompt(tokenizer, turns[-1]["content"])
    return Prompt(text_ids(tokenizer, text), text)


def _refuse_chat_extras(body: dict) -> None:
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise ApiError(400, f"'response_format' {short(response_format)} is not supported: this server writes text "
                            "only ({\"type\": \"text\"})", param="response_format")
    for name in ("tools", "functions"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported: this server does not call tools", param=name)
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise ApiError(400, f"'{name}' is not supported: this server does not call tools", param=name)
    if body.get("parallel_tool_calls") is not None:
        raise ApiError(400, "'parallel_tool_calls' is not supported: this server does not call tools",
                       param="parallel_tool_calls")


def parse(body: dict, chat: bool, tokenizer, cultures: list[str], context_length: int, vocab_size: int,
          accept_language: str | None = None) -> ParsedRequest:
    """A /v1/completions (chat=False) or /v1/chat/completions body (and its Accept-Language header) as a
    ParsedRequest; ApiError naming the first bad field."""
    _refuse_unknown(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    model = check_model(body, cultures)
    hint = culture_hint(body, cultures, accept_language)
    if chat:
        _refuse_chat_extras(body)
        prompts = [chat_prompt(body, tokenizer)]
        want = _field(body, "logprobs", (bool,), "a boolean", False)
        top = _field(body, "top_logprobs", (int,), "an integer", None)
        if top is not None and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs, echo = (top or 0) if want else None, False
        field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        n = best_of = _field(body, "n", (int,), "an integer", 1)
    else:
        if body.get("suffix") not in (None, ""):
            raise ApiError(400, "'suffix' is not supported: this server completes text at its end only", param="suffix")
        prompts = completion_prompts(body, tokenizer, vocab_size)
        echo = _field(body, "echo", (bool,), "a boolean", False)
        logprobs = _field(body, "logprobs", (int,), "an integer", None)
        field = "max_tokens"
        n = _field(body, "n", (int,), "an integer", 1)
        best_of = _field(body, "best_of", (int,), "an integer", n)
    name = "top_logprobs" if chat else "logprobs"
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"'{name}' must be in [0, {MAX_LOGPROBS}], got {short(logprobs)}", param=name)
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"'n' must be in [1, {MAX_CHOICES}], got {n}", param="n")
    if not n <= best_of <= MAX_CHOICES:
        raise ApiError(400, f"'best_of' must be in [n={n}, {MAX_CHOICES}], got {best_of}", param="best_of")
    stream, include_usage = _stream(body)
    if stream and best_of > n:
        raise ApiError(400, "'best_of' greater than 'n' cannot be streamed", param="best_of")
    longest = max(len(p.ids) for p in prompts)
    if longest >= context_length:
        where = "messages" if chat else "prompt"
        raise ApiError(400, f"'{where}' is {longest} tokens, but the context holds {context_length} (prompt and at least "
                            f"one new token)", param=where, code="context_length_exceeded")
    room = context_length - longest
    max_tokens = _field(body, field, (int,), "an integer", room if chat else min(COMPLETION_MAX_TOKENS, room))
    low = 0 if echo else 1
    if max_tokens < low:
        raise ApiError(400, f"'{field}' must be at least {low}{' (0 only with echo)' if not echo else ''}, got {max_tokens}",
                       param=field)
    if max_tokens > room:
        raise ApiError(400, f"'{field}' is {max_tokens}, but the prompt's {longest} tokens leave {room} of the context's "
                            f"{context_length}", param=field, code="context_length_exceeded")
    scored = logprobs if logprobs is not None else (0 if best_of > n else None)  # best_of ranks by logprob
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=_field(body, "temperature", (int, float), "a number", 1.0),
            top_p=_field(body, "top_p", (int, float), "a number", 1.0), seed=_field(body, "seed", (int,), "an integer"),
            stop=_stop(body), presence_penalty=_field(body, "presence_penalty", (int, float), "a number", 0.0),
            frequency_penalty=_field(body, "frequency_penalty", (int, float), "a number", 0.0),
            logit_bias=_logit_bias(body), logprobs=scored,
            prompt_logprobs=logprobs if echo and logprobs is not None else None, vocab_size=vocab_size)
    except SamplingError as e:
        raise ApiError(400, str(e), param=e.param) from None
    _field(body, "user", (str,), "a string")
    return ParsedRequest(chat=chat, model=model, prompts=prompts, params=params, n=n, best_of=best_of, echo=echo,
                         logprobs=logprobs, stream=stream, include_usage=include_usage, hint=hint)
