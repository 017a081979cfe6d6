"""LLM backends for synthesis: an OpenAI-compatible HTTP API and a local transformers model.

Every backend turns a SynthRequest into reply text (parsed by moa.synth.prompting.parse_reply).
The offline backend lives in moa.synth.offline; moa.synth.pipeline.make_backend builds the
backend a config names. API keys are read from the environment variable
named in the config and appear in no message, cache key or output.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod

from moa.data import padding_id
from moa.errors import UsageError
from moa.synth.httpjson import HttpClient, HttpError
from moa.synth.prompting import SynthRequest


class BackendError(UsageError):
    """An LLM call that failed (network, HTTP status or a malformed API reply)."""


class Backend(ABC):
    name = "backend"

    @abstractmethod
    def generate(self, request: SynthRequest) -> str:
        """The LLM's reply text for one synthesis request."""

    def identity(self) -> dict:
        """What determines the replies (part of the cache key; never includes secrets)."""
        return {"backend": self.name}

    @property
    def source(self) -> str:
        """The `source` field of rows this backend wrote."""
        return self.name


class OpenAIBackend(Backend):
    """POST {base_url}/chat/completions, as served by OpenAI, vLLM, llama.cpp, Ollama and others."""

    name = "openai"

    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1", api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 0.7, max_tokens: int = 2048, timeout_s: float = 60.0, max_retries: int = 5,
                 requests_per_minute: float | None = None, json_mode: bool = True, client: HttpClient | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise UsageError(f"openai base_url must start with http:// or https://, got {base_url!r}")
        self.model, self.base_url = model, base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.temperature, self.max_tokens, self.json_mode = temperature, max_tokens, json_mode
        self.client = client or HttpClient(timeout_s=timeout_s, max_retries=max_retries,
                                           requests_per_minute=requests_per_minute)

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def _headers(self) -> dict:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if not key and self.base_url.startswith("https://api.openai.com"):
            raise BackendError(f"environment variable {self.api_key_env!r} is not set; the OpenAI API needs a key")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def generate(self, request: SynthRequest) -> str:
        body = {"model": self.model, "messages": request.messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        url = f"{self.base_url}/chat/completions"
        try:
            reply = self.client.request_json("POST", url, body, headers=self._headers())
        except HttpError as e:
            raise BackendError(str(e)) from None
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"malformed reply from {url}: expected choices[0].message.content, "
                               f"got {str(reply)[:200]}") from None
        if not isinstance(content, str):
            raise BackendError(f"malformed reply from {url}: message content is {type(content).__name__}, not text")
        return content

    def identity(self) -> dict:
        return {"backend": self.name, "model": self.model, "base_url": self.base_url,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "json_mode": self.json_mode}

    @property
    def source(self) -> str:
        return f"openai:{self.model}"


class TransformersBackend(Backend):
    """A local causal LM: a hub name or path (loaded on first use), or a model and tokenizer given directly."""

    name = "transformers"

    def __init__(self, model="Qwen/Qwen2.5-1.5B-Instruct", tokenizer=None, max_new_tokens: int = 1024,
                 temperature: float = 0.7, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
        self.model_ref, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.device, self.dtype, self.trust_remote_code = device, dtype, trust_remote_code
        self.model = None if isinstance(model, str) else model
        if self.model is not None and tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass tokenizer=...")

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

    def generate(self, request: SynthRequest) -> str:
        import torch
        if self.model is None:
            self._load()
        encoded = self.tokenizer(self._prompt_text(request.messages), return_tensors="pt", add_special_tokens=False)
        device = next(self.model.parameters()).device
        encoded = {k: v.to(device) for k, v in encoded.items()}
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        torch.manual_seed(request.seed + request.round)
        with torch.no_grad():
            out = self.model.generate(**encoded, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=padding_id(self.tokenizer),
                                      **sampling)
        return self.tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    def identity(self) -> dict:
        ref = self.model_ref if isinstance(self.model_ref, str) else type(self.model_ref).__name__
        return {"backend": self.name, "model": ref, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature}

    @property
    def source(self) -> str:
        ref = self.model_ref if isinstance(self.model_ref, str) else type(self.model_ref).__name__
        return f"transformers:{ref}"

