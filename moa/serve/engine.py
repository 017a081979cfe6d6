"""The continuous-batching engine of `moa serve`: requests of every culture decode together, one forward per step.

Interface (what the HTTP app uses):
    engine = Engine(model, tokenizer, max_batch_size=32, max_cache_tokens=65536, max_queue=256, prefill_chunk=256,
                    max_model_len=None, min_router_confidence=0.5, fallback_culture=None)
    engine.start()                                   # the step loop runs on a background thread
    handle = engine.submit(Request(prompt_ids, model, SamplingParams(...)), on_event)
        # raises QueueFull (retry_after_s) when max_queue requests already wait, ValueError naming the bad
        # field (prompt_ids, model, max_tokens) for a request it cannot run, and RuntimeError once
        # shutdown began; sampling parameters are checked where SamplingParams is built
    handle.cancel()                                  # the request leaves the batch at the next step
    engine.switch(model)                             # serve another run of the same base from the next free step
    engine.shutdown(timeout_s) -> bool               # stop admitting, finish what was submitted, stop the thread
    engine.metrics                                   # the one metrics source (moa.serve.metrics.Metrics)
    engine.stats() -> dict                           # gauges and counters, see `Engine.stats`
    engine.cultures (the adapters' names), engine.context_length (the most tokens, prompt + new, a request may
    hold: the smallest of the model's context, max_cache_tokens / max_batch_size and max_model_len)
`on_event(Event)` is called from the engine thread, in order: one "routed" (culture: a culture name or
"base"; router_confidence: the router's sequence-level probability of its pick for the prompt;
decided_by: what chose the culture, see below; prompt_logprobs where asked), one "token" per new token
(token_id, text: the new text, held back while it may begin a stop string or ends in a partial
character; offset: where the token's text starts in the output; logprob and top where asked), then one
"done" (finish_reason "stop" | "length" | "cancelled" | "error", message for "error"). It must be
cheap and must not block.

The parts: the scheduler (moa/serve/scheduler.py) decides what each step prefills and holds the
running batch's KV slab (moa/serve/kv_slab.py); the sampler (moa/serve/sampler.py) picks every row's
token in one pass; a detokenizer per request (moa/serve/detokenizer.py) turns tokens into text and
finds stop strings; the metrics (moa/serve/metrics.py) count. This class runs the forwards and
passes results between them.

A step: prefill what the scheduler planned (whole prompts together in one left-padded forward with a
transformers DynamicCache of its own, a longer prompt chunk by chunk); a request whose prompt is done
samples its first token and its keys and values join the slab; then one decode forward runs every
running row, each with its own culture ('oracle' routing, culture id -1 for "base": no adapter).
`switch(model)` drains: nothing new is admitted, the running requests finish on the weights they
started with, then the loop thread swaps the model between two steps and the waiting requests run on
the new one (a request naming a culture the new run lacks ends with an error).
An "auto" request's culture is decided by moa.infer.culture_choice.decide: the router's pick for the prompt
(`model.route_sequences`, which reads only the embeddings) when its confidence is at least
`min_router_confidence` (decided_by "router"), else the request's culture hint ("hint"), else
`fallback_culture` (None: the base model; "fallback"); a request naming its culture or "base" says
"request". A failure while prefilling, sampling or detokenizing ends only the requests it touched,
with an "error" event, a log line and a count in `moa_request_failures_total`; a failed decode
forward ends the rows it ran; the engine goes on.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from moa import compat
from moa.data.padding import pad_batch
from moa.infer.culture_choice import DEFAULT_MIN_CONFIDENCE, check_fallback, check_min_confidence, decide
from moa.infer.generate import eos_ids
from moa.infer.sampling import SamplingParams
from moa.serve import openmp
from moa.serve.detokenizer import Detokenizer
from moa.serve.kv_slab import KVSlab
from moa.serve.metrics import Metrics
from moa.serve.sampler import RowState, Sample, Sampler, prompt_logprobs
from moa.serve.scheduler import QueueFull, Scheduler

__all__ = ["Engine", "Event", "Handle", "QueueFull", "Request", "SamplingParams"]
log = logging.getLogger("moa.serve")


@dataclass
class Request:
    prompt_ids: list[int]
    model: str  # a culture name, "auto" (the router's pick for the prompt) or "base" (no adapter)
    params: SamplingParams
    request_id: str = ""  # for log lines
    hint: str | None = None  # "auto": the culture to run when the router abstains (a culture name)


@dataclass
class Event:
    kind: str  # "routed" | "token" | "done"
    culture: str | None = None  # routed
    router_confidence: float | None = None  # routed
    decided_by: str | None = None  # routed: "router" | "hint" | "fallback" | "request"
    prompt_logprobs: list | None = None  # routed: (logprob, [(token, logprob)]) per prompt token after the first
    token_id: int | None = None  # token
    text: str = ""  # token: the text delta
    offset: int = 0  # token: where its text starts in the output text
    logprob: float | None = None  # token
    top: list | None = None  # token: [(token, logprob)]
    finish_reason: str | None = None  # done
    message: str | None = None  # done, for "error"


class Handle:
    """A submitted request, for cancelling it."""

    def __init__(self, seq: "Sequence"):
        self._seq = seq

    def cancel(self) -> None:
        """The request leaves the batch at the next step, and gets a "done" event with finish_reason "cancelled"."""
        self._seq.cancelled = True


class Sequence:
    """One request's state inside the engine."""

    def __init__(self, request: Request, on_event: Callable[[Event], None], culture_id: int | None, tokenizer,
                 cultures: list[str]):
        self.cultures = cultures
        self.request, self.params, self.on_event = request, request.params, on_event
        self.prompt_ids = request.prompt_ids
        self.culture_id = culture_id  # None for "auto" until routed
        self.confidence = None  # the router's probability of its pick for the prompt
        self.decided_by = "request" if culture_id is not None else None  # "auto": set when routed
        self.cancelled = self.done = False
        self.cache = None  # its own DynamicCache while prefilling alone
        self.prefilled = 0  # prompt tokens in its cache
        self.prompt_logprobs: list = []
        self.tokens: list[int] = []
        self.detokenizer = Detokenizer(tokenizer, request.params.stop)
        self.arrival = time.perf_counter()
        self.last_token_time = None
        seed = request.params.seed
        self.generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        self.row = RowState(request.params, self.generator, self.tokens)

    @property
    def culture(self) -> str:
        return "base" if self.culture_id < 0 else self.cultures[self.culture_id]


class Engine:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 32, max_cache_tokens: int = 65536,
                 max_queue: int = 256, prefill_chunk: int = 256, max_model_len: int | None = None,
                 min_router_confidence: float = DEFAULT_MIN_CONFIDENCE, fallback_culture: str | None = None):
        for name, value in (("max_batch_size", max_batch_size), ("max_cache_tokens", max_cache_tokens),
                            ("max_queue", max_queue), ("prefill_chunk", prefill_chunk),
                            ("max_model_len", max_model_len or 1)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_cache_tokens < max_batch_size:
            raise ValueError(f"max_cache_tokens {max_cache_tokens} leaves no KV-cache token to each of the {max_batch_size} "
                             f"rows (max_batch_size): expected at least {max_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_cache_tokens = max_batch_size, max_cache_tokens
        self.cultures = list(model.config.cultures)
        self.min_confidence = check_min_confidence(min_router_confidence, "min_router_confidence")
        self.fallback = check_fallback(fallback_culture, self.cultures)
        self.vocab_size = int(model.base_model.config.vocab_size)
        # the running batch's KV cache (full-attention models only): a row per request of max_cache_tokens / max_batch_size tokens
        slab = KVSlab(model.base_model.config, max_batch_size, max_cache_tokens // max_batch_size)
        self.scheduler = Scheduler(slab, max_batch_size, max_queue, prefill_chunk)
        positions = int(model.base_model.config.max_position_embeddings)
        # the most tokens (prompt + new) a request may hold: the model's context, or a slab row where that is smaller
        limits = [(positions, "the model's context"),
                  (slab.max_columns, f"max_cache_tokens {max_cache_tokens} / max_batch_size {max_batch_size}")]
        if max_model_len is not None:
            limits.append((max_model_len, f"max_model_len {max_model_len}"))
        self.context_length, self._context_limit = min(limits, key=lambda limit: limit[0])
        self.eos = eos_ids(model, tokenizer)
        self.sampler = Sampler()
        self.metrics = Metrics(self.cultures + ["base"])
        self._thread: threading.Thread | None = None

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
        seq = Sequence(request, on_event, self._check(request), self.tokenizer, self.cultures)
        self.scheduler.add(seq)
        return Handle(seq)

    def shutdown(self, timeout_s: float) -> bool:
        """Stop admitting, let submitted requests finish for up to `timeout_s`, end the rest with an
        "error" event and stop the thread. True if every request finished on its own."""
        deadline = time.monotonic() + timeout_s
        scheduler = self.scheduler
        with scheduler.lock:
            scheduler.stopping = True
            if self._thread is not None:
                while scheduler.busy() and time.monotonic() < deadline:
                    scheduler.lock.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            finished = not scheduler.busy()
            scheduler.deadline_passed = True
            scheduler.lock.notify()
        if self._thread is None:  # never started: nothing ran, the waiting requests end here
            for seq in scheduler.drain():
                self._finish(seq, "error", "the engine shut down before the request finished")
        else:
            self._thread.join()
        return finished

    def switch(self, model) -> None:
        """Serve `model` (a MoAForCausalLM on the same base, so the tokenizer and KV slab still fit) from the first
        step at which no request runs; returns once it serves. Requests in flight finish on the old model."""
        scheduler = self.scheduler
        if self.fallback is not None and self.fallback not in model.config.cultures:
            raise ValueError(f"the run has no culture {self.fallback!r}, the fallback culture this server runs with: "
                             f"it has {list(model.config.cultures)}")
        done = threading.Event()
        with scheduler.lock:
            if scheduler.switch is not None:
                raise RuntimeError("a switch to another model is already in progress")
            if self._thread is None:
                self._use(model)
                return
            scheduler.switch = (model, done)
            scheduler.lock.notify()
        done.wait()

    @property
    def switching(self) -> bool:
        """A switch waits for the running requests to finish (new requests wait for it)."""
        return self.scheduler.switch is not None

    def _use(self, model) -> None:
        """Swap in `model` (no request running); waiting requests are resolved against its cultures."""
        self.model, self.cultures = model, list(model.config.cultures)
        self.metrics.add_models(self.cultures)
        gone = []
        with self.scheduler.lock:
            for seq in self.scheduler.waiting:
                name = seq.request.model
                seq.cultures = self.cultures
                if name in self.cultures:
                    seq.culture_id = self.cultures.index(name)
                elif name != "base" and (name != "auto" or seq.request.hint not in self.cultures + [None]):
                    gone.append(seq)
            for seq in gone:
                self.scheduler.waiting.remove(seq)
        for seq in gone:
            name = seq.request.model if seq.request.model != "auto" else seq.request.hint
            self._finish(seq, "error", f"the server switched to a run without culture {name!r}")

    def stats(self) -> dict:
        """queue_depth, running (rows in the decode batch), prefilling, cache_tokens (KV-cache token slots
        held, padding included), peak_cache_tokens, max_cache_tokens, steps (decode steps so far),
        per_culture ({name: {requests, tokens}}, "base" included), finished ({reason: count}), failures
        ({stage: count}), first_tokens (requests that got a first token)."""
        return {**self.scheduler.gauges(), **self.metrics.counts(), "max_cache_tokens": self.max_cache_tokens}

    def render_metrics(self) -> str:
        return self.metrics.render(self.scheduler.gauges())

    # ------------------------------------------------------------------ checks
    def _check(self, request: Request) -> int | None:
        """The request's culture id (-1 for "base", None for "auto"); ValueError naming a bad field."""
        p, ids = request.params, request.prompt_ids
        if not ids or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt_ids must be a non-empty list of token ids in 0..{self.vocab_size - 1}")
        if request.model not in self.cultures + ["auto", "base"]:
            raise ValueError(f"unknown model {request.model!r}: expected one of {self.cultures + ['auto', 'base']}")
        if request.hint is not None and request.hint not in self.cultures:
            raise ValueError(f"unknown culture hint {request.hint!r}: expected one of {self.cultures}")
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(p).__name__}")
        if len(ids) + p.max_tokens > self.context_length:
            raise ValueError(f"max_tokens {p.max_tokens} + the prompt's {len(ids)} tokens exceed the {self.context_length} "
                             f"tokens a request may hold ({self._context_limit})")
        if any(token >= self.vocab_size for token, _ in p.logit_bias):
            raise ValueError(f"logit_bias names token ids past the vocabulary's {self.vocab_size}")
        if request.model == "auto":
            return None
        return -1 if request.model == "base" else self.cultures.index(request.model)

    # ------------------------------------------------------------------ the step loop
    def _loop(self) -> None:
        scheduler = self.scheduler
        with torch.no_grad():
            while (plan := scheduler.next_step()) is not None:
                if plan.switch is not None:
                    model, done = plan.switch
                    self._use(model)
                    done.set()
                for seq in plan.cancelled:
                    self._finish(seq, "cancelled")
                cancelled = [seq for seq in scheduler.running if seq.cancelled]
                scheduler.leave(cancelled)
                for seq in cancelled:
                    self._finish(seq, "cancelled")
                if plan.whole:
                    self._prefill_whole(plan.whole)
                for seq, tokens in plan.chunks:
                    self._guard("prefill", [seq], self._prefill, seq, tokens)
                if scheduler.running:
                    self._guard("decode", list(scheduler.running), self._decode)
        for seq in scheduler.drain():
            self._finish(seq, "error", "the engine shut down before the request finished")

    def _guard(self, stage: str, seqs: list, fn, *args) -> None:
        """Run one part of a step; if it raises, the requests it held (and only they) end with an error."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 (one part's failure ends its own requests, never the engine)
            self._fail([seq for seq in seqs if not seq.done], stage, f"{type(e).__name__}: {e}")

    def _prefill_whole(self, seqs: list) -> None:
        """Prefill whole prompts together; if that fails, each request not yet started again on its own, so a
        request that cannot be prefilled fails alone."""
        try:
            self._prefill_together(seqs)
        except Exception as e:  # noqa: BLE001
            if len(seqs) == 1:
                return self._fail(seqs, "prefill", f"{type(e).__name__}: {e}")
            started = [seq for seq in seqs if seq.tokens and not seq.done]
            self._fail(started, "prefill", f"{type(e).__name__}: {e}")
            for seq in seqs:
                if not seq.tokens and not seq.done:
                    self._guard("prefill", [seq], self._prefill_together, [seq])

    def _fail(self, seqs: list, stage: str, message: str) -> None:
        """Requests held by a part of a step that failed leave the batch and end with an error."""
        self.scheduler.leave(seqs)
        for seq in seqs:
            self._fail_row(seq, stage, message)

    # ------------------------------------------------------------------ forwards
    def _forward(self, ids, mask, positions, culture_ids, cache, all_positions: bool = False) -> torch.Tensor:
        """Logits (float32) of one forward that extends `cache`: the last position's [B, V], or every
        position's [B, T, V] with `all_positions`. A batch of "base" rows only runs the base model alone."""
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True,
                  "logits_to_keep": 0 if all_positions else 1, **compat.cache_kwargs(cache)}
        if all(c < 0 for c in culture_ids):
            out = self.model.base_model(**kwargs)
        else:
            out = self.model(culture_ids=culture_ids, routing="oracle", **kwargs)
        return out.logits.float() if all_positions else out.logits[:, -1].float()

    def _route(self, seqs: list[Sequence], ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """The router's pick and confidence for each request's prompt; an "auto" request runs under the culture
        `decide` gives: the pick when confident enough, else its hint, else the fallback."""
        culture, confidence = self.model.route_sequences(ids, mask)
        for row, seq in enumerate(seqs):
            seq.confidence = float(confidence[row])
            if seq.culture_id is None:
                decision = decide(self.cultures[int(culture[row])], seq.confidence, seq.request.hint, self.min_confidence,
                                  self.fallback)
                seq.culture_id = -1 if decision.culture is None else self.cultures.index(decision.culture)
                seq.decided_by = decision.decided_by

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor, start: int, end: int) -> None:
        """Append the logprobs of prompt tokens start+1..end (at most the prompt's last) from logits [T, V]
        of positions start..end-1, where `seq` asked for them."""
        k = seq.params.prompt_logprobs
        stop = min(end, len(seq.prompt_ids) - 1)
        if k is not None and stop > start:
            targets = torch.tensor(seq.prompt_ids[start + 1:stop + 1], device=logits.device)
            seq.prompt_logprobs += prompt_logprobs(logits[:stop - start], targets, k)

    def _prefill_together(self, seqs: list[Sequence]) -> None:
        """Prefill whole prompts in one left-padded forward; each request samples its first token and the
        ones not finished by it join the running batch."""
        ids, mask = pad_batch([seq.prompt_ids for seq in seqs], 0, left=True, device=self.model.device)
        self._route(seqs, ids, mask)
        cache = compat.new_kv_cache(self.model.base_model.config)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        scored = any(seq.params.prompt_logprobs is not None for seq in seqs)
        logits = self._forward(ids, mask, positions, [seq.culture_id for seq in seqs], cache, all_positions=scored)
        if scored:
            for row, seq in enumerate(seqs):
                self._score_prompt(seq, logits[row, ids.shape[1] - len(seq.prompt_ids):], 0, len(seq.prompt_ids))
            logits = logits[:, -1]
        joining = [row for row, seq in enumerate(seqs) if self._first_token(seq, logits[row:row + 1])]
        self.scheduler.leave([seq for seq in seqs if seq.done])
        if joining:
            self.scheduler.join([seqs[row] for row in joining], compat.kv_tensors(cache), joining)

    def _prefill(self, seq: Sequence, budget: int) -> None:
        """Run the next `budget` prompt tokens (at most) of one request alone; at the prompt's end it samples
        its first token and joins the running batch."""
        device, prompt = self.model.device, seq.prompt_ids
        if seq.cache is None:
            self._route([seq], torch.tensor([prompt], device=device), None)
            seq.cache = compat.new_kv_cache(self.model.base_model.config)
        start = seq.prefilled
        end = min(len(prompt), start + budget)
        scored = seq.params.prompt_logprobs is not None
        logits = self._forward(torch.tensor([prompt[start:end]], device=device),
                               torch.ones(1, end, dtype=torch.long, device=device),
                               torch.arange(start, end, device=device)[None], [seq.culture_id], seq.cache,
                               all_positions=scored)
        if scored:
            self._score_prompt(seq, logits[0], start, end)
            logits = logits[:, -1]
        seq.prefilled = end
        if end == len(prompt):
            cache, seq.cache = seq.cache, None
            if self._first_token(seq, logits):
                self.scheduler.join([seq], compat.kv_tensors(cache), [0])
            else:
                self.scheduler.leave([seq])

    def _first_token(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """A prefilled request says which culture runs it and samples its first token (none when it asked for
        max_tokens 0: the prompt scored alone). True when it goes on decoding (it stays on the prefill list until it
        joins the running batch or leaves)."""
        self.metrics.started(seq.culture, seq.decided_by)
        scored = seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None
        self._send(seq, Event("routed", culture=seq.culture, router_confidence=seq.confidence, decided_by=seq.decided_by,
                              prompt_logprobs=scored))
        if seq.params.max_tokens == 0:
            self._finish(seq, "length")
            return False
        return not self._emit(seq, self.sampler.sample(logits, [seq.row])[0])

    def _decode(self) -> None:
        scheduler = self.scheduler
        rows = list(scheduler.running)
        ids = torch.tensor([[seq.tokens[-1]] for seq in rows], device=self.model.device)
        mask, positions = scheduler.slab.decode_inputs()
        logits = self._forward(ids, mask, positions, scheduler.culture_ids, scheduler.slab.cache)
        scheduler.slab.advance()
        self.metrics.step(scheduler.cache_tokens())
        samples = self.sampler.sample(logits, [seq.row for seq in rows])
        scheduler.leave([seq for seq, sample in zip(rows, samples) if self._emit(seq, sample)])

    # ------------------------------------------------------------------ tokens and text
    def _emit(self, seq: Sequence, sample: Sample) -> bool:
        """Deliver one new token (and "done" when it ends the request). True when the request is finished."""
        if sample.error is not None:
            self._fail_row(seq, "sampling", sample.error)
            return True
        now = time.perf_counter()
        first = seq.last_token_time is None
        self.metrics.token(seq.culture, now - (seq.arrival if first else seq.last_token_time), first)
        seq.last_token_time = now
        token = sample.token
        seq.tokens.append(token)
        final = token in self.eos or len(seq.tokens) >= seq.params.max_tokens
        offset = seq.detokenizer.length
        try:
            text, stopped = seq.detokenizer.add(token, final)
        except Exception as e:  # noqa: BLE001 (the row fails alone)
            self._fail_row(seq, "detokenize", f"{type(e).__name__}: {e}")
            return True
        self._send(seq, Event("token", token_id=token, text=text, offset=offset, logprob=sample.logprob, top=sample.top))
        if stopped or final:
            self._finish(seq, "stop" if stopped or token in self.eos else "length")
        return seq.done

    def _fail_row(self, seq: Sequence, stage: str, message: str) -> None:
        """One request failed: logged, counted and ended with an error (its caller takes it out of the batch)."""
        self.metrics.failure(stage)
        log.error("request %s failed while %s: %s", seq.request.request_id or "-", _STAGES[stage], message)
        self._finish(seq, "error", f"{_STAGES[stage]} failed: {message}")

    def _send(self, seq: Sequence, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception:  # noqa: BLE001 (a consumer's failure is its own)
            log.exception("request %s: its event consumer failed", seq.request.request_id or "-")
            seq.cancelled = True

    def _finish(self, seq: Sequence, reason: str, message: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        self.metrics.finish(reason)
        self.scheduler.finished(seq)
        self._send(seq, Event("done", finish_reason=reason, message=message))


_STAGES = {"prefill": "prefilling", "decode": "decoding", "sampling": "sampling", "detokenize": "detokenizing"}
