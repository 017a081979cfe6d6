"""The continuous-batching engine of `moa serve`: requests of every culture decode together, one forward per step.

Interface (what the HTTP app uses):
    engine = Engine(model, tokenizer, max_batch_size=32, max_cache_tokens=65536, max_queue=256, prefill_chunk=256)
    engine.start()                                   # the step loop runs on a background thread
    handle = engine.submit(Request(prompt_ids, model, SamplingParams(...)), on_event)
        # raises QueueFull (retry_after_s) when max_queue requests already wait, ValueError naming the bad
        # field (prompt_ids, model, max_tokens, temperature, top_p) for a request it cannot run, and
        # RuntimeError once shutdown began
    handle.cancel()                                  # the request leaves the batch at the next step
    engine.shutdown(timeout_s) -> bool               # stop admitting, finish what was submitted, stop the thread
    engine.stats() -> dict                           # see `Engine.stats`
    engine.cultures (the adapters' names), engine.context_length (the most tokens, prompt + new, a request may
    hold: the model's context, or max_cache_tokens / max_batch_size where that is smaller)
`on_event(Event)` is called from the engine thread, in order: one "routed" (culture: a culture name or
"base"; router_confidence: the router's sequence-level probability of its pick for the prompt), one
"token" per new token (token_id, text: the new text, held back while it may begin a stop string or
ends in a partial character), then one "done" (finish_reason "stop" | "length" | "cancelled" | "error",
message for "error"). It must be cheap and must not block.

How a step runs: waiting requests are admitted while the batch has a free row (`max_batch_size`
rows); at most `prefill_chunk` prompt tokens are prefilled per step over all new requests, so running
requests wait for one chunk, not for whole prompts: the new requests whose whole prompts fit the
step's budget are prefilled together in one left-padded forward (a transformers DynamicCache of their
own), a longer prompt alone, chunk by chunk over several steps. A request whose prompt is done samples
its first token and its keys and values are copied into a free row of the running batch's KV slab.
Then one decode forward runs every running row, each with its own culture ('oracle' routing, culture
id -1 for "base": no adapter), and finished or cancelled rows leave (the slab's last row takes a freed
one).

The running batch's KV cache is a `KVSlab` (moa/serve/kv_slab.py): per layer one preallocated buffer
of `max_batch_size` rows x up to `max_cache_tokens / max_batch_size` tokens, which bounds its memory;
a request whose prompt + max_tokens exceeds a row is refused. Rows carry an explicit attention mask
and their own position ids, so each row computes what it would compute alone. Under 'oracle' routing
the gates do not run, so the cache holds no router sums. "auto" requests take the router's pick for
the prompt (`model.route_sequences`, which reads only the embeddings) and run under it, as `moa
generate --routing prompt` does.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from moa import compat
from moa.data.padding import pad_batch
from moa.infer.generate import eos_ids
from moa.serve import openmp
from moa.serve.kv_slab import KVSlab

FINISH_REASONS = ("stop", "length", "cancelled", "error")
LATENCY_SAMPLES = 10000  # TTFT and inter-token latency samples kept for stats()


@dataclass
class SamplingParams:
    max_tokens: int  # new tokens, >= 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    seed: int | None = None  # per-request torch.Generator seed
    stop: tuple[str, ...] = ()  # stop strings: the text before the first one is returned


@dataclass
class Request:
    prompt_ids: list[int]
    model: str  # a culture name, "auto" (the router's pick for the prompt) or "base" (no adapter)
    params: SamplingParams


@dataclass
class Event:
    kind: str  # "routed" | "token" | "done"
    culture: str | None = None  # routed
    router_confidence: float | None = None  # routed
    token_id: int | None = None  # token
    text: str = ""  # token: the text delta
    finish_reason: str | None = None  # done
    message: str | None = None  # done, for "error"


class QueueFull(Exception):
    """`max_queue` requests already wait; retry after `retry_after_s` seconds."""

    def __init__(self, depth: int, retry_after_s: float):
        super().__init__(f"the engine's queue is full ({depth} requests waiting); retry in {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


class Handle:
    """A submitted request, for cancelling it."""

    def __init__(self, slot: "_Slot"):
        self._slot = slot

    def cancel(self) -> None:
        """The request leaves the batch at the next step, and gets a "done" event with finish_reason "cancelled"."""
        self._slot.cancelled = True


class _Slot:
    """One request's state inside the engine."""

    def __init__(self, request: Request, on_event: Callable[[Event], None], culture_id: int | None):
        self.request, self.params, self.on_event = request, request.params, on_event
        self.culture_id = culture_id  # None for "auto" until routed
        self.confidence = None  # the router's probability of its pick for the prompt
        self.cancelled = False
        self.cache = None  # its own DynamicCache while prefilling
        self.prefilled = 0  # prompt tokens in its cache
        self.tokens: list[int] = []
        self.text = ""  # decoded text of tokens[:read_offset]
        self.prefix_offset = self.read_offset = 0  # tokens[prefix_offset:read_offset] decode to the end of `text`
        self.emitted = 0  # characters of the decoded text sent
        self.arrival = time.perf_counter()
        self.last_token_time = None
        seed = request.params.seed
        self.generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())


class Engine:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 32, max_cache_tokens: int = 65536,
                 max_queue: int = 256, prefill_chunk: int = 256):
        for name, value in (("max_batch_size", max_batch_size), ("max_cache_tokens", max_cache_tokens),
                            ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_cache_tokens < max_batch_size:
            raise ValueError(f"max_cache_tokens {max_cache_tokens} leaves no KV-cache token to each of the {max_batch_size} "
                             f"rows (max_batch_size): expected at least {max_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_cache_tokens = max_batch_size, max_cache_tokens
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.cultures = list(model.config.cultures)
        # the running batch's KV cache (full-attention models only): a row per request of max_cache_tokens / max_batch_size tokens
        self._slab = KVSlab(model.base_model.config, max_batch_size, max_cache_tokens // max_batch_size)
        positions = int(model.base_model.config.max_position_embeddings)
        # the most tokens (prompt + new) a request may hold: the model's context, or a slab row where that is smaller
        self.context_length = min(positions, self._slab.max_columns)
        self._context_limit = ("the model's context" if positions <= self._slab.max_columns else
                               f"max_cache_tokens {max_cache_tokens} / max_batch_size {max_batch_size}")
        self.eos = eos_ids(model, tokenizer)
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Slot] = collections.deque()
        self._prefilling: list[_Slot] = []
        self._rows: list[_Slot] = []  # the running batch, in slab row order
        self._culture_ids: list[int] = []  # of the running rows, -1 = base
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._deadline_passed = False  # shutdown's timeout: the loop ends the requests left
        self._steps = 0
        self._peak_cache_tokens = 0
        self._counters = {name: {"requests": 0, "tokens": 0} for name in self.cultures + ["base"]}
        self._finished = dict.fromkeys(FINISH_REASONS, 0)
        self._ttft = collections.deque(maxlen=LATENCY_SAMPLES)
        self._itl = collections.deque(maxlen=LATENCY_SAMPLES)
        self._durations = collections.deque(maxlen=100)  # seconds of recently finished requests

    # ------------------------------------------------------------------ the interface
    def start(self) -> None:
        """Start the step loop on a background thread."""
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        openmp.release_idle_threads()  # this thread's OpenMP pool would slow every op of the step loop's thread
        self._thread = threading.Thread(target=self._loop, name="moa-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Queue a request; its events go to `on_event` from the engine thread."""
        culture_id = self._check(request)
        slot = _Slot(request, on_event, culture_id)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shutting down: it admits no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(len(self._waiting), self._retry_after())
            self._waiting.append(slot)
            self._lock.notify()
        return Handle(slot)

    def shutdown(self, timeout_s: float) -> bool:
        """Stop admitting, let submitted requests finish for up to `timeout_s`, end the rest with an
        "error" event and stop the thread. True if every request finished on its own."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._stopping = True
            if self._thread is None:  # never started: nothing ran, the waiting requests end here
                left, finished = list(self._waiting), not self._waiting
                self._waiting.clear()
            else:
                while self._busy() and time.monotonic() < deadline:
                    self._lock.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                finished = not self._busy()
                self._deadline_passed = True
                self._lock.notify()
        if self._thread is None:
            for slot in left:
                self._finish(slot, "error", "the engine shut down before the request finished")
        else:
            self._thread.join()
        return finished

    def stats(self) -> dict:
        """queue_depth, running (rows in the decode batch), prefilling, cache_tokens (KV-cache token
        slots held, padding included), peak_cache_tokens, max_cache_tokens, steps (decode steps so far),
        per_culture ({name: {requests, tokens}}, "base" included), finished ({reason: count}), ttft_s and
        itl_s (the latest latency samples, seconds)."""
        with self._lock:
            return {"queue_depth": len(self._waiting), "running": len(self._rows), "prefilling": len(self._prefilling),
                    "cache_tokens": self._cache_tokens(), "peak_cache_tokens": self._peak_cache_tokens,
                    "max_cache_tokens": self.max_cache_tokens, "steps": self._steps,
                    "per_culture": {k: dict(v) for k, v in self._counters.items()}, "finished": dict(self._finished),
                    "ttft_s": list(self._ttft), "itl_s": list(self._itl)}

    # ------------------------------------------------------------------ checks and bookkeeping
    def _check(self, request: Request) -> int | None:
        """The request's culture id (-1 for "base", None for "auto"); ValueError naming a bad field."""
        p = request.params
        ids = request.prompt_ids
        if not ids or not all(isinstance(t, int) and 0 <= t < self.model.base_model.config.vocab_size for t in ids):
            raise ValueError(f"prompt_ids must be a non-empty list of token ids in 0..{self.model.base_model.config.vocab_size - 1}")
        if request.model not in self.cultures + ["auto", "base"]:
            raise ValueError(f"unknown model {request.model!r}: expected one of {self.cultures + ['auto', 'base']}")
        if not isinstance(p.max_tokens, int) or p.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {p.max_tokens!r}")
        if len(ids) + p.max_tokens > self.context_length:
            raise ValueError(f"max_tokens {p.max_tokens} + the prompt's {len(ids)} tokens exceed the {self.context_length} "
                             f"tokens a request may hold ({self._context_limit})")
        if not p.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {p.temperature!r}")
        if not 0 < p.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p.top_p!r}")
        if request.model == "auto":
            return None
        return -1 if request.model == "base" else self.cultures.index(request.model)

    def _retry_after(self) -> float:
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1.0, mean * (1 + len(self._waiting) / self.max_batch_size))

    def _busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._rows)

    def _cache_tokens(self) -> int:
        return self._slab.tokens_held() + sum(slot.prefilled for slot in self._prefilling)

    def _admit(self) -> None:
        """Move waiting requests into prefill while the batch has a free row (under the lock)."""
        while self._waiting:
            slot = self._waiting[0]
            if slot.cancelled:
                self._waiting.popleft()
                self._finish(slot, "cancelled")
                continue
            if len(self._rows) + len(self._prefilling) >= self.max_batch_size:
                return
            self._prefilling.append(self._waiting.popleft())

    # ------------------------------------------------------------------ the step loop
    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._lock:
                    if self._deadline_passed or (self._stopping and not self._busy()):
                        break
                    self._admit()
                    if not (self._prefilling or self._rows):
                        self._lock.wait(0.05)
                        continue
                try:
                    self._step()
                except Exception as e:  # a failed forward ends the requests it held; the engine goes on
                    for slot in self._rows + self._prefilling:
                        self._finish(slot, "error", f"{type(e).__name__}: {e}")
                    with self._lock:
                        self._rows, self._prefilling, self._culture_ids = [], [], []
                        self._slab.clear()
            with self._lock:
                left = list(self._waiting) + self._prefilling + self._rows
                self._waiting.clear()
                self._rows, self._prefilling, self._culture_ids = [], [], []
                self._slab.clear()
                self._lock.notify_all()
        for slot in left:
            self._finish(slot, "error", "the engine shut down before the request finished")

    def _step(self) -> None:
        cancelled = [slot for slot in self._rows if slot.cancelled]
        self._drop(cancelled)
        for slot in cancelled:
            self._finish(slot, "cancelled")
        for slot in [s for s in self._prefilling if s.cancelled]:
            self._prefilling.remove(slot)
            self._finish(slot, "cancelled")
        budget, whole, chunks = self.prefill_chunk, [], []
        for slot in self._prefilling:  # in arrival order, while the step's budget lasts
            if budget == 0:
                break
            left = len(slot.request.prompt_ids) - slot.prefilled
            if slot.cache is None and left <= budget:
                whole.append(slot)
            else:
                chunks.append((slot, min(left, budget)))
            budget -= min(left, budget)
        if whole:
            self._prefill_together(whole)
        for slot, tokens in chunks:
            self._prefill(slot, tokens)
        if self._rows:
            self._decode()

    def _forward(self, ids, mask, positions, culture_ids, cache) -> torch.Tensor:
        """Last-position logits [B, V] (float32) of one forward that extends `cache`; a batch of "base"
        rows only runs the base model alone (no routing call: no adapter op)."""
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True,
                  **compat.cache_kwargs(cache)}
        if all(c < 0 for c in culture_ids):
            out = self.model.base_model(**kwargs)
        else:
            out = self.model(culture_ids=culture_ids, routing="oracle", **kwargs)
        return out.logits[:, -1].float()

    def _route(self, slots: list[_Slot], ids: torch.Tensor, mask: torch.Tensor) -> None:
        """The router's pick and confidence for each request's prompt (rows of ids/mask); an "auto" request
        runs under the pick."""
        culture, confidence = self.model.route_sequences(ids, mask)
        for row, slot in enumerate(slots):
            if slot.culture_id is None:
                slot.culture_id = int(culture[row])
            slot.confidence = float(confidence[row])

    def _prefill_together(self, slots: list[_Slot]) -> None:
        """Prefill whole prompts in one left-padded forward; each request samples its first token and the
        ones not finished by it join the running batch."""
        ids, mask = pad_batch([slot.request.prompt_ids for slot in slots], 0, left=True, device=self.model.device)
        self._route(slots, ids, mask)
        cache = compat.new_kv_cache(self.model.base_model.config)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = self._forward(ids, mask, positions, [slot.culture_id for slot in slots], cache)
        joining = [row for row, slot in enumerate(slots) if not self._first_token(slot, logits[row])]
        if joining:
            self._join([slots[row] for row in joining], cache, joining)

    def _prefill(self, slot: _Slot, budget: int) -> None:
        """Run the next `budget` prompt tokens (at most) of one request alone; at the prompt's end it samples
        its first token and joins the running batch."""
        device = self.model.device
        prompt = slot.request.prompt_ids
        if slot.cache is None:
            self._route([slot], torch.tensor([prompt], device=device), None)
            slot.cache = compat.new_kv_cache(self.model.base_model.config)
        start = slot.prefilled
        end = min(len(prompt), start + budget)
        logits = self._forward(torch.tensor([prompt[start:end]], device=device),
                               torch.ones(1, end, dtype=torch.long, device=device),
                               torch.arange(start, end, device=device)[None], [slot.culture_id], slot.cache)
        slot.prefilled = end
        if end == len(prompt):
            cache, slot.cache = slot.cache, None
            if not self._first_token(slot, logits[0]):
                self._join([slot], cache, [0])

    def _first_token(self, slot: _Slot, logits: torch.Tensor) -> bool:
        """A prefilled request leaves the prefill list, says which culture runs it and samples its first
        token. True when that token finishes it."""
        name = "base" if slot.culture_id < 0 else self.cultures[slot.culture_id]
        with self._lock:
            if slot in self._prefilling:
                self._prefilling.remove(slot)
            self._counters[name]["requests"] += 1
        slot.on_event(Event("routed", culture=name, router_confidence=slot.confidence))
        return self._emit(slot, self._sample(logits, slot))

    def _decode(self) -> None:
        device = self.model.device
        ids = torch.tensor([[slot.tokens[-1]] for slot in self._rows], device=device)
        mask, positions = self._slab.decode_inputs()
        logits = self._forward(ids, mask, positions, self._culture_ids, self._slab.cache)
        self._slab.advance()
        with self._lock:
            self._steps += 1
            self._peak_cache_tokens = max(self._peak_cache_tokens, self._cache_tokens())
        done = [slot for row, slot in enumerate(self._rows) if self._emit(slot, self._sample(logits[row], slot))]
        self._drop(done)

    def _join(self, slots: list[_Slot], cache, rows: list[int]) -> None:
        """Add prefilled requests (rows `rows` of a left-padded prefill cache) to the running batch as its last rows."""
        with self._lock:
            self._slab.join(compat.kv_tensors(cache), rows, [len(slot.request.prompt_ids) for slot in slots])
            self._rows += slots
            self._culture_ids += [slot.culture_id for slot in slots]
            self._peak_cache_tokens = max(self._peak_cache_tokens, self._cache_tokens())

    def _drop(self, leaving: list[_Slot]) -> None:
        """Remove rows from the running batch (the slab moves its last rows into the freed ones)."""
        if not leaving:
            return
        with self._lock:
            order = self._slab.remove([row for row, slot in enumerate(self._rows) if slot in leaving])
            self._rows = [self._rows[row] for row in order]
            self._culture_ids = [self._culture_ids[row] for row in order]

    # ------------------------------------------------------------------ tokens and text
    def _sample(self, logits: torch.Tensor, slot: _Slot) -> int:
        p = slot.params
        if p.temperature == 0:
            return int(logits.argmax())
        probs = (logits.cpu() / p.temperature).softmax(-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p  # the nucleus keeps at least one token
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=slot.generator))

    def _emit(self, slot: _Slot, token: int) -> bool:
        """Deliver one new token (and "done" when it ends the request). True when the request is finished."""
        now = time.perf_counter()
        if slot.last_token_time is None:
            sample, into = now - slot.arrival, self._ttft
        else:
            sample, into = now - slot.last_token_time, self._itl
        slot.last_token_time = now
        slot.tokens.append(token)
        name = "base" if slot.culture_id < 0 else self.cultures[slot.culture_id]
        with self._lock:
            into.append(sample)
            self._counters[name]["tokens"] += 1
        text = self._detokenize(slot)
        stops = [i for i in (text.find(s, max(0, slot.emitted - len(s))) for s in slot.params.stop if s) if i >= 0]
        if stops:
            reason, end = "stop", min(stops)
        elif token in self.eos:
            reason, end = "stop", len(text)
        elif len(slot.tokens) >= slot.params.max_tokens:
            reason, end = "length", len(text)
        else:
            reason, end = None, len(text) - _held_back(text, slot.params.stop)
        delta = text[slot.emitted:max(end, slot.emitted)]
        slot.emitted += len(delta)
        slot.on_event(Event("token", token_id=token, text=delta))
        if reason is not None:
            self._finish(slot, reason)
        return reason is not None

    def _detokenize(self, slot: _Slot) -> str:
        """The request's text so far, decoding only the tokens since the last complete character (as
        vLLM does): a step costs the same however long the output is."""
        prefix = self.tokenizer.decode(slot.tokens[slot.prefix_offset:slot.read_offset], skip_special_tokens=True)
        window = self.tokenizer.decode(slot.tokens[slot.prefix_offset:], skip_special_tokens=True)
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            slot.text += window[len(prefix):]
            slot.prefix_offset, slot.read_offset = slot.read_offset, len(slot.tokens)
            return slot.text
        return slot.text + window[len(prefix):]

    def _finish(self, slot: _Slot, reason: str, message: str | None = None) -> None:
        with self._lock:
            self._finished[reason] += 1
            self._durations.append(time.perf_counter() - slot.arrival)
        slot.on_event(Event("done", finish_reason=reason, message=message))


def _held_back(text: str, stops) -> int:
    """Characters at the end of `text` not to send yet: a partial character, or the start of a stop string."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held
