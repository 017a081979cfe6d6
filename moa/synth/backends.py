"""LLM backends for synthesis: an OpenAI-compatible API (through the official `openai` client) and a
local transformers model.

Every backend turns a SynthRequest into a Reply (text, parsed by moa.synth.prompting.parse_reply, and
token counts) with `await backend.generate(request)`; the pipeline runs up to `backend.concurrency`
of them at once. The offline backend lives in moa.synth.offline; moa.synth.pipeline.make_backend
builds the backend a config names. API keys are read from the environment variable named in the
config and appear in no message, cache key or output.
"""
from __future__ import annotations

import asyncio
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from moa.data import padding_id
from moa.errors import UsageError
from moa.synth.prompting import SynthRequest


class BackendError(UsageError):
    """An LLM call that failed (network, HTTP status or a malformed API reply)."""


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Backend(ABC):
    name = "backend"
    concurrency = 1  # calls the pipeline runs at once

    @abstractmethod
    async def generate(self, request: SynthRequest) -> Reply:
        """The LLM's reply for one synthesis request."""

    def identity(self) -> dict:
        """What determines the replies (part of the cache key; never includes secrets)."""
        return {"backend": self.name}

    @property
    def source(self) -> str:
        """The `source` field of rows this backend wrote."""
        return self.name


class RateLimiter:
    """Requests-per-minute and tokens-per-minute budgets as token buckets refilled continuously.

    `await acquire(tokens)` waits, first come first served, until one request and `tokens` tokens
    fit into what the last minute allows. A budget of None is no limit."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None):
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be positive or None, got {value!r}")
        self.budgets = [b for b in (requests_per_minute, tokens_per_minute)]
        self.levels = [b for b in self.budgets]  # what is left now; starts full
        self.stamp = time.monotonic()
        self.lock, self.loop = None, None

    async def acquire(self, tokens: int) -> None:
        if self.budgets == [None, None]:
            return
        if self.loop is not asyncio.get_running_loop():
            self.lock, self.loop = asyncio.Lock(), asyncio.get_running_loop()
        async with self.lock:
            wanted = [1, tokens]
            while True:
                now = time.monotonic()
                elapsed, self.stamp = now - self.stamp, now
                waits = []
                for i, budget in enumerate(self.budgets):
                    if budget is None:
                        continue
                    self.levels[i] = min(budget, self.levels[i] + elapsed * budget / 60)
                    need = min(wanted[i], budget)  # a request larger than the budget waits for a full bucket
                    waits.append(max(0.0, (need - self.levels[i]) * 60 / budget))
                if max(waits) <= 0:
                    for i, budget in enumerate(self.budgets):
                        if budget is not None:
                            self.levels[i] -= min(wanted[i], budget)
                    return
                await asyncio.sleep(max(waits))


def estimated_tokens(messages: list, max_tokens: int) -> int:
    """What a call counts against a tokens-per-minute budget: about 4 characters a prompt token, plus
    the reply's max_tokens (as OpenAI counts it)."""
    return sum(len(m["content"]) for m in messages) // 4 + max_tokens


class OpenAIBackend(Backend):
    """POST {base_url}/chat/completions through `openai.AsyncOpenAI`, as served by OpenAI, vLLM,
    llama.cpp, Ollama and `moa serve`.

    The client retries timeouts, connection errors, 429 and 5xx with exponential backoff and jitter,
    honouring Retry-After (seconds or an HTTP date); the rate limiter keeps to the minute budgets."""

    name = "openai"

    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1", api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 0.7, max_tokens: int = 2048, timeout_s: float = 60.0, max_retries: int = 5,
                 concurrency: int = 16, requests_per_minute: float | None = None,
                 tokens_per_minute: float | None = None, json_mode: bool = True):
        if not base_url.startswith(("http://", "https://")):
            raise UsageError(f"openai base_url must start with http:// or https://, got {base_url!r}")
        if concurrency < 1 or timeout_s <= 0 or max_retries < 0:
            raise UsageError(f"need concurrency >= 1, timeout_s > 0 and max_retries >= 0; got {concurrency}, "
                             f"{timeout_s}, {max_retries}")
        self.model, self.base_url = model, base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.temperature, self.max_tokens, self.json_mode = temperature, max_tokens, json_mode
        self.timeout_s, self.max_retries, self.concurrency = timeout_s, max_retries, concurrency
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        self._client, self._loop = None, None

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def api_key(self) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if not key and self.base_url.startswith("https://api.openai.com"):
            raise BackendError(f"environment variable {self.api_key_env!r} is not set; the OpenAI API needs a key")
        return key or "unused"

    def client(self):
        """The AsyncOpenAI client of the running event loop (one connection pool per loop)."""
        from openai import AsyncOpenAI
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key(), timeout=self.timeout_s,
                                       max_retries=self.max_retries)
            self._loop = loop
        return self._client

    def body(self, request: SynthRequest) -> dict:
        """The chat completions request body (also a line of a Batch API input file)."""
        body = {"model": self.model, "messages": request.messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    async def generate(self, request: SynthRequest) -> Reply:
        import openai
        url = f"{self.base_url}/chat/completions"
        await self.limiter.acquire(estimated_tokens(request.messages, self.max_tokens))
        try:  # the body as JSON and the reply as a dict: the typed create() costs ~1 ms of CPU a call
            completion = await self.client().post("/chat/completions", body=self.body(request), cast_to=object)
        except openai.APIStatusError as e:
            raise BackendError(f"POST {url} failed with HTTP {e.status_code}: {str(e.message)[:200]}") from None
        except openai.APITimeoutError:
            raise BackendError(f"POST {url} timed out after {self.timeout_s}s "
                               f"({self.max_retries + 1} attempt(s))") from None
        except openai.APIConnectionError as e:
            raise BackendError(f"POST {url}: connection failed: {e}") from None
        except (openai.APIError, ValueError) as e:  # a reply that is not a chat completion
            raise BackendError(f"malformed reply from {url}: {str(e)[:200]}") from None
        return self.parse_completion(completion, url)

    @staticmethod
    def parse_completion(completion, url: str) -> Reply:
        """The Reply in a chat completion's JSON (a dict; anything else is a malformed reply)."""
        try:
            content = completion["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"malformed reply from {url}: expected choices[0].message.content, "
                               f"got {str(completion)[:200]}") from None
        if not isinstance(content, str):
            raise BackendError(f"malformed reply from {url}: message content is {type(content).__name__}, not text")
        usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else {}
        return Reply(content, usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)

    def identity(self) -> dict:
        return {"backend": self.name, "model": self.model, "base_url": self.base_url,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "json_mode": self.json_mode}

    @property
    def source(self) -> str:
        return f"openai:{self.model}"


class TransformersBackend(Backend):
    """A local causal LM: a hub name or path (loaded on first use), or a model and tokenizer given directly.

    Requests that arrive together are generated as one left-padded batch of up to `batch_size`."""

    name = "transformers"

    def __init__(self, model="Qwen/Qwen2.5-1.5B-Instruct", tokenizer=None, max_new_tokens: int = 1024,
                 temperature: float = 0.7, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False):
        if batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model_ref, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.batch_size = self.concurrency = batch_size
        self.device, self.dtype, self.trust_remote_code = device, dtype, trust_remote_code
        self.model = None if isinstance(model, str) else model
        if self.model is not None and tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass tokenizer=...")
        self.waiting, self.worker = [], None

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_ref, trust_remote_code=self.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_ref, dtype=self.dtype,
                                                          trust_remote_code=self.trust_remote_code).to(device).eval()

    def _prompt_text(self, messages: list) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "

    def generate_batch(self, requests: list[SynthRequest]) -> list[Reply]:
        """Replies to `requests`, generated together (prompts left-padded)."""
        import torch
        if self.model is None:
            self._load()
        prompts = [self.tokenizer(self._prompt_text(r.messages), add_special_tokens=False)["input_ids"]
                   for r in requests]
        width, pad = max(map(len, prompts)), padding_id(self.tokenizer)
        device = next(self.model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        torch.manual_seed(requests[0].seed + requests[0].round)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=pad, **sampling)
        replies = []
        for p, row in zip(prompts, out[:, width:].tolist()):
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            replies.append(Reply(text, len(p), sum(t != pad for t in row)))
        return replies

    async def generate(self, request: SynthRequest) -> Reply:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((request, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.ensure_future(self._work())
        return await future

    async def _work(self) -> None:
        """Generate what is waiting, batch_size requests at a time, in a thread (the event loop stays free)."""
        while self.waiting:
            await asyncio.sleep(0)  # let the requests made at the same time arrive
            batch, self.waiting = self.waiting[:self.batch_size], self.waiting[self.batch_size:]
            batch = [(r, f) for r, f in batch if not f.cancelled()]
            if not batch:
                continue
            try:
                replies = await asyncio.to_thread(self.generate_batch, [r for r, _ in batch])
            except Exception as e:  # every waiting call learns of the failure
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), reply in zip(batch, replies):
                if not f.done():
                    f.set_result(reply)

    def identity(self) -> dict:
        ref = self.model_ref if isinstance(self.model_ref, str) else type(self.model_ref).__name__
        return {"backend": self.name, "model": ref, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature}

    @property
    def source(self) -> str:
        ref = self.model_ref if isinstance(self.model_ref, str) else type(self.model_ref).__name__
        return f"transformers:{ref}"
