"""The OpenAI-compatible HTTP app of `moa serve`: Starlette endpoints in front of the continuous-batching engine.

Endpoints: `GET /v1/models` (every culture, `auto` and `base`), `POST /v1/completions`,
`POST /v1/chat/completions` (streamed as server-sent events ending in `data: [DONE]`, or not),
`GET /health` and `GET /metrics` (Prometheus text). A request's `model` picks its culture; every
response, and the first chunk of a stream, carries `"moa": {"culture", "router_confidence"}`.
Bad requests get a 4xx with an OpenAI-style error body naming the field; a full engine queue gets
429 with Retry-After. The engine calls back from its own thread; each request's events cross into
the event loop through `loop.call_soon_threadsafe` onto an asyncio queue.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from moa.data import format_prompt
from moa.serve.engine import QueueFull, Request, SamplingParams

SPECIAL_MODELS = ("auto", "base")
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
# seconds; the upper bounds of the latency histograms (Prometheus adds +Inf)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = {429: "rate_limit_error", 500: "server_error", 502: "upstream_error", 503: "service_unavailable_error",
                504: "upstream_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def dumps(obj) -> str:
    return json.dumps(obj, allow_nan=False)


async def read_json(request: HTTPRequest, max_body_bytes: int) -> dict:
    """The request's JSON object; 413 past `max_body_bytes` (read no further), 400 when it is not a JSON object."""
    too_large = ApiError(413, f"request body is over the limit of {max_body_bytes} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise too_large
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(value).__name__}")
    return value


def _number(body: dict, name: str, default, kinds=(int, float), expected="a number"):
    """body[name] (null or absent: `default`), refusing values of the wrong JSON type (booleans are not numbers)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {expected}, got {value!r}", param=name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of them, got {stop!r}", param="stop")
    return tuple(stops)


def check_model(body: dict, cultures: list[str]) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string (a culture, 'auto' or 'base'), got {model!r}", param="model")
    if model not in list(cultures) + list(SPECIAL_MODELS):
        raise ApiError(404, f"unknown model {model!r}: expected one of {list(cultures) + list(SPECIAL_MODELS)}",
                       param="model", code="model_not_found")
    return model


def prompt_ids(body: dict, chat: bool, tokenizer) -> tuple[list[int], str]:
    """(token ids, the field they came from). A completion's 'prompt' is raw text; a chat's 'messages' go
    through the tokenizer's chat template, else training's plain format (moa.data.format_prompt for the
    last user turn, earlier turns as 'Role: text' lines before it), so one user message gives
    moa.data.encode_prompt's ids. The tokenizer's BOS goes first unless a chat template placed it."""
    template = getattr(tokenizer, "chat_template", None)
    if not chat:
        text = body.get("prompt")
        if not isinstance(text, str) or not text:
            raise ApiError(400, f"'prompt' must be a non-empty string, got {text!r}", param="prompt")
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {\"role\": system|user|assistant, "
                                f"\"content\": string}}, got {messages!r}", param="messages")
        if template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        elif messages[-1]["role"] != "user":
            raise ApiError(400, f"the last message must be the user's (this model's prompt format ends with a user turn), "
                                f"got role {messages[-1]['role']!r}", param="messages")
        else:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages[:-1])
            text += format_prompt(tokenizer, messages[-1]["content"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and not (chat and template):
        ids = [bos] + ids
    return ids, "messages" if chat else "prompt"


def parse_request(body: dict, chat: bool, tokenizer, cultures: list[str], context_length: int) -> tuple[Request, bool]:
    """(engine request, stream) for a completion or chat body; ApiError naming the first bad field."""
    model = check_model(body, cultures)
    ids, field = prompt_ids(body, chat, tokenizer)
    if len(ids) >= context_length:
        raise ApiError(400, f"'{field}' is {len(ids)} tokens, but the context holds {context_length} "
                            f"(prompt and at least one new token)", param=field, code="context_length_exceeded")
    room = context_length - len(ids)
    max_tokens = _number(body, "max_tokens", room if chat else min(COMPLETION_MAX_TOKENS, room), int, "an integer")
    if max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    if max_tokens > room:
        raise ApiError(400, f"'max_tokens' is {max_tokens}, but the prompt's {len(ids)} tokens leave {room} of the "
                            f"context's {context_length}", param="max_tokens", code="context_length_exceeded")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise ApiError(400, f"'temperature' must be at least 0 (0 is greedy), got {temperature}", param="temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    seed = _number(body, "seed", None, int, "an integer")
    n = _number(body, "n", 1, int, "an integer")
    if n != 1:
        raise ApiError(400, f"'n' must be 1 (one choice per request), got {n}", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be a boolean, got {stream!r}", param="stream")
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed,
                            stop=_stop(body))
    return Request(prompt_ids=ids, model=model, params=params), stream


def models_response(cultures: list[str], **fields) -> JSONResponse:
    """The /v1/models list: every culture (as vLLM lists LoRA modules), then `auto` and `base`, each with `fields`."""
    created = int(time.time())
    return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "moa", **fields}
                                                     for name in list(cultures) + list(SPECIAL_MODELS)]})


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, the sum and the count of observations."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound}"}} {n}' for bound, n in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """What /metrics reports beyond the engine's gauges, counted on the event loop as requests run."""

    def __init__(self, models: list[str]):
        self.requests = dict.fromkeys(models, 0)  # per culture that ran (`base` included)
        self.tokens = dict.fromkeys(models, 0)
        self.finished: dict[str, int] = {}
        self.rejected: dict[int, int] = {}
        self.ttft, self.itl = Histogram(), Histogram()

    def render(self, stats: dict) -> str:
        lines = ["# HELP moa_requests_total Requests that started generating, by the culture that ran them.",
                 "# TYPE moa_requests_total counter"]
        lines += [f'moa_requests_total{{culture="{c}"}} {n}' for c, n in self.requests.items()]
        lines += ["# HELP moa_generated_tokens_total New tokens generated, by culture.", "# TYPE moa_generated_tokens_total counter"]
        lines += [f'moa_generated_tokens_total{{culture="{c}"}} {n}' for c, n in self.tokens.items()]
        lines += ["# HELP moa_finished_requests_total Requests finished, by finish reason (stop, length, cancelled, error).",
                  "# TYPE moa_finished_requests_total counter"]
        lines += [f'moa_finished_requests_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        lines += ["# HELP moa_rejected_requests_total Requests answered with an error before they ran, by HTTP status.",
                  "# TYPE moa_rejected_requests_total counter"]
        lines += [f'moa_rejected_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.rejected.items())]
        for name, key, text in (("moa_queue_depth", "queue_depth", "Requests waiting for a slot in the running batch."),
                                ("moa_running_batch_size", "running", "Requests in the running (decode) batch."),
                                ("moa_prefilling", "prefilling", "Requests admitted whose prompts are being prefilled."),
                                ("moa_cache_tokens", "cache_tokens", "KV-cache tokens held by the running batch.")):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {stats[key]}"]
        lines += ["# HELP moa_time_to_first_token_seconds From the request's arrival to its first new token.",
                  "# TYPE moa_time_to_first_token_seconds histogram", *self.ttft.lines("moa_time_to_first_token_seconds"),
                  "# HELP moa_inter_token_latency_seconds Between consecutive new tokens of a request.",
                  "# TYPE moa_inter_token_latency_seconds histogram", *self.itl.lines("moa_inter_token_latency_seconds")]
        return "\n".join(lines) + "\n"


class Generation:
    """One engine request seen from the event loop: its events counted into the metrics as they arrive
    (whether or not anyone still reads them) and queued in order for the response."""

    def __init__(self, engine, request: Request, metrics: Metrics):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.metrics, self.arrival, self.last_token = metrics, time.perf_counter(), None
        self.culture, self.confidence, self.tokens, self.finish_reason, self.message = None, None, 0, None, None
        try:
            self.handle = engine.submit(request, lambda event: loop.call_soon_threadsafe(self._receive, event))
        except QueueFull as e:
            raise ApiError(429, "the server's queue is full: retry later", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))}) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:  # the engine is shutting down
            raise ApiError(503, str(e), code="shutting_down") from None

    def _receive(self, event) -> None:
        metrics = self.metrics
        if event.kind == "routed":
            self.culture, self.confidence = event.culture, event.router_confidence
            metrics.requests[event.culture] += 1
        elif event.kind == "token":
            now = time.perf_counter()
            if self.last_token is None:
                metrics.ttft.observe(now - self.arrival)
            else:
                metrics.itl.observe(now - self.last_token)
            self.last_token = now
            self.tokens += 1
            metrics.tokens[self.culture] += 1
        else:
            metrics.finished[event.finish_reason] = metrics.finished.get(event.finish_reason, 0) + 1
        self.queue.put_nowait(event)

    async def events(self):
        """Yield ("routed", None), then ("token", text delta) for each new token, and return once the
        request is done (finish_reason set); cancels the engine request if the consumer stops early."""
        try:
            while self.finish_reason is None:
                event = await self.queue.get()
                if event.kind == "done":
                    self.finish_reason, self.message = event.finish_reason, event.message
                else:
                    yield event.kind, event.text if event.kind == "token" else None
        finally:
            if self.finish_reason is None:
                self.handle.cancel()

    def moa(self) -> dict:
        return {"culture": self.culture, "router_confidence": self.confidence}


async def _cancel_on_disconnect(request: HTTPRequest, generation: Generation) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.handle.cancel()


async def sse_events(generation: Generation, head: dict, chat: bool):
    """The server-sent events of a stream: a first chunk with the `moa` field once the request is routed, a chunk
    per text delta, a last one with the finish reason (or an error object), then `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish_reason=None, **extra) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return f"data: {dumps({**head, 'object': kind, 'choices': [choice], **extra})}\n\n"

    async for what, delta in generation.events():
        if what == "routed":
            yield chunk(None, moa=generation.moa())
        elif delta:
            yield chunk(delta)
    if generation.finish_reason == "error":
        yield f"data: {dumps(ApiError(500, f'generation failed: {generation.message}').body())}\n\n"
    else:
        yield chunk("", generation.finish_reason)
    yield "data: [DONE]\n\n"


def create_app(engine, tokenizer, *, max_body_bytes: int = 1 << 20, shutdown_timeout: float = 30.0) -> Starlette:
    """The Starlette app serving `engine` (started and shut down with the app's lifespan)."""
    cultures = list(engine.cultures)
    metrics = Metrics(cultures + ["base"])

    async def models(request):
        return models_response(cultures, max_model_len=engine.context_length)

    async def health(request):
        stats = engine.stats()
        return JSONResponse({"status": "ok", "queue_depth": stats["queue_depth"], "running": stats["running"]})

    async def metrics_text(request):
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    def endpoint(chat: bool):
        kind = "chat.completion" if chat else "text_completion"

        async def handle(request):
            try:
                body = await read_json(request, max_body_bytes)
                engine_request, stream = parse_request(body, chat, tokenizer, cultures, engine.context_length)
                generation = Generation(engine, engine_request, metrics)
            except ApiError as e:
                metrics.rejected[e.status] = metrics.rejected.get(e.status, 0) + 1
                return e.response()
            head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": engine_request.model}
            if stream:
                return StreamingResponse(sse_events(generation, head, chat), media_type="text/event-stream")
            watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
            try:
                text = "".join([delta async for what, delta in generation.events() if what == "token"])
            finally:
                watcher.cancel()
            if generation.finish_reason == "error":
                return ApiError(500, f"generation failed: {generation.message}").response()
            choice = {"index": 0, "finish_reason": generation.finish_reason}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None})
            prompt_tokens = len(engine_request.prompt_ids)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generation.tokens,
                     "total_tokens": prompt_tokens + generation.tokens}
            return JSONResponse({**head, "object": kind, "choices": [choice], "usage": usage, "moa": generation.moa()})

        return handle

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)

    return Starlette(routes=[Route("/v1/models", models), Route("/health", health), Route("/metrics", metrics_text),
                             Route("/v1/completions", endpoint(chat=False), methods=["POST"]),
                             Route("/v1/chat/completions", endpoint(chat=True), methods=["POST"])],
                     lifespan=lifespan)
