"""The OpenAI-compatible HTTP app of `moa serve`: Starlette endpoints in front of the continuous-batching engine.

Endpoints: `GET /v1/models` and `/v1/models/{id}` (every culture, `auto` and `base`), `POST
/v1/completions`, `POST /v1/chat/completions` (streamed as server-sent events ending in `data:
[DONE]`, or not), vLLM's tokenizer endpoints `GET /tokenizer_info`, `POST /tokenize`, `POST
/detokenize`, `GET /version`, and the open `GET /health` and `GET /metrics` (Prometheus text). A
request's `model` picks its culture (`auto`: moa.infer.culture_choice's rule, the request's hint from its
`moa` field or Accept-Language header); every response, and each choice's first chunk of a stream,
carries `"moa": {"culture", "router_confidence", "decided_by"}`. Bodies are parsed in
moa/serve/openai_protocol.py; a bad request gets a 4xx with an OpenAI-style error body naming the field, a full engine queue 429
with Retry-After, anything unexpected a JSON 500 (never plain text). The engine calls back from its
own thread; each request's events cross into the event loop through `loop.call_soon_threadsafe` onto
one asyncio queue per HTTP request. Tokenizing runs on a worker thread, off the event loop.

`guard` (an ASGI middleware around every endpoint) gives each request an id (its `X-Request-Id`, or a
new one, echoed in the response and the log line), requires `Authorization: Bearer <api key>` on
/v1/* and the tokenizer endpoints when a key is set (compared in constant time), refuses POST bodies
that are not `application/json` (415: a web page cannot post one to a local server without a CORS
preflight) and turns any unhandled exception into a JSON 500.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from moa.serve.detokenizer import TokenStrings, text_offsets
from moa.serve.engine import QueueFull, Request
from moa.serve.openai_protocol import SPECIAL_MODELS, ApiError, ParsedRequest, chat_prompt, parse, short, text_ids

log = logging.getLogger("moa.serve")
PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info", "/admin/")
REQUEST_ID = re.compile(r"^[\w.:@-]{1,128}$")


def dumps(obj) -> str:
    return json.dumps(obj, allow_nan=False)


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_json(request: HTTPRequest, max_body_bytes: int, timeout_s: float = 30.0) -> dict:
    """The request's JSON object: 413 past `max_body_bytes` (read no further), 408 when the body takes longer
    than `timeout_s` to arrive, 400 when it is not a JSON object of valid text."""
    too_large = ApiError(413, f"request body is over the limit of {max_body_bytes} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body_bytes:
        raise too_large
    body = bytearray()

    async def receive():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_body_bytes:
                raise too_large

    try:
        await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g}s", code="request_timeout") from None
    try:
        value = json.loads(body)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") cannot be text
    except (UnicodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {short(str(e), 200)}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(value).__name__}")
    return value


def models_response(cultures: list[str], model: str | None = None, **fields) -> JSONResponse:
    """The /v1/models list (every culture, as vLLM lists LoRA modules, then `auto` and `base`), or one of them."""
    created = int(time.time())
    card = lambda name: {"id": name, "object": "model", "created": created, "owned_by": "moa", **fields}  # noqa: E731
    names = list(cultures) + list(SPECIAL_MODELS)
    if model is None:
        return JSONResponse({"object": "list", "data": [card(name) for name in names]})
    if model not in names:
        raise ApiError(404, f"unknown model {short(model)}: expected one of {names}", param="model", code="model_not_found")
    return JSONResponse(card(model))


def guard(app, api_key: str | None):
    """The ASGI middleware described in the module docstring."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start, status = time.perf_counter(), [None]

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        async def answer(error: ApiError):
            await error_response(error)(scope, receive, tagged_send)

        path, method = scope["path"], scope["method"]
        try:
            if expected and path.startswith(PROTECTED) and not hmac.compare_digest(headers.get(b"authorization", b""), expected):
                await answer(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key"))
            elif method == "POST" and headers.get(b"content-type", b"").split(b";")[0].strip().lower() != b"application/json":
                await answer(ApiError(415, "the body must be JSON sent as Content-Type: application/json, got "
                                           f"{short(headers.get(b'content-type', b'').decode('latin-1'))}",
                                      code="unsupported_media_type"))
            else:
                await app(scope, receive, tagged_send)
        except Exception:  # noqa: BLE001 (any failure is answered as JSON and logged with the request's id)
            log.exception("request %s %s %s failed", request_id, method, path)
            if status[0] is None:
                await answer(ApiError(500, f"internal error (request {request_id}); the server log has the details"))
        log.info("%s %s %s %s %.3fs", request_id, method, path, status[0], time.perf_counter() - start)

    return middleware


class Choice:
    """What one engine request (one choice) has produced so far."""

    def __init__(self, index: int, prompt):
        self.index, self.prompt = index, prompt
        self.culture = self.confidence = self.decided_by = self.prompt_logprobs = None
        self.text, self.tokens, self.logprobs, self.tops, self.offsets = [], [], [], [], []
        self.finish_reason = self.message = None

    def add(self, event) -> None:
        if event.kind == "routed":
            self.culture, self.confidence, self.decided_by = event.culture, event.router_confidence, event.decided_by
            self.prompt_logprobs = event.prompt_logprobs
        elif event.kind == "token":
            self.text.append(event.text)
            self.tokens.append(event.token_id)
            self.logprobs.append(event.logprob)
            self.tops.append(event.top)
            self.offsets.append(event.offset)
        else:
            self.finish_reason, self.message = event.finish_reason, event.message

    def moa(self) -> dict:
        return {"culture": self.culture, "router_confidence": self.confidence, "decided_by": self.decided_by}

    def cumulative_logprob(self) -> float:
        return sum(p for p in self.logprobs if p is not None)


class Generation:
    """The engine requests of one HTTP request (every prompt times best_of), their events merged on one queue."""

    def __init__(self, engine, parsed: ParsedRequest, request_id: str):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices, self.handles, self.open = [], [], 0
        try:
            for p, prompt in enumerate(parsed.prompts):
                for j in range(parsed.best_of):
                    choice = Choice(p * parsed.best_of + j, prompt)
                    request = Request(prompt.ids, parsed.model, parsed.choice_params(j), request_id=request_id,
                                      hint=parsed.hint)
                    callback = lambda event, c=choice: loop.call_soon_threadsafe(self.queue.put_nowait, (c, event))  # noqa: E731
                    self.handles.append(engine.submit(request, callback))
                    self.choices.append(choice)
                    self.open += 1
        except QueueFull as e:
            self.cancel()
            raise ApiError(429, "the server's queue is full: retry later", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))}) from None
        except ValueError as e:
            self.cancel()
            raise ApiError(400, short(str(e), 300)) from None
        except RuntimeError as e:  # the engine is shutting down
            self.cancel()
            raise ApiError(503, str(e), code="shutting_down") from None

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def events(self):
        """Yield (choice, event) as they arrive until every choice is done; cancel the rest if the consumer stops."""
        try:
            while self.open:
                choice, event = await self.queue.get()
                choice.add(event)
                if event.kind == "done":
                    self.open -= 1
                yield choice, event
        finally:
            if self.open:
                self.cancel()

    def failed(self) -> Choice | None:
        return next((c for c in self.choices if c.finish_reason == "error"), None)


async def _cancel_on_disconnect(request: HTTPRequest, generation: Generation) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


class Responses:
    """OpenAI response bodies built from finished or streaming choices."""

    def __init__(self, tokenizer, parsed: ParsedRequest, head: dict):
        self.parsed, self.head, self.strings = parsed, head, TokenStrings(tokenizer)
        self.tokenizer = tokenizer
        self.object = "chat.completion" if parsed.chat else "text_completion"

    def _top(self, top, token, logprob) -> dict:
        entries = {self.strings.get(t): v for t, v in top}
        entries.setdefault(self.strings.get(token), logprob)
        return entries

    def completion_logprobs(self, choice: Choice, start: int, echo: bool) -> dict:
        """The legacy logprobs object of tokens start.. of `choice` (with the prompt's first when `echo`)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        shift = 0
        if echo:
            prompt = choice.prompt
            text, offsets = text_offsets(self.tokenizer, prompt.ids)
            scored = [(None, None)] + [(lp, top) for lp, top in (choice.prompt_logprobs or [])]
            for token, offset, (lp, top) in zip(prompt.ids, offsets, scored):
                out["tokens"].append(self.strings.get(token))
                out["token_logprobs"].append(lp)
                out["top_logprobs"].append(None if lp is None else self._top(top, token, lp))
                out["text_offset"].append(offset)
            shift = len(prompt.text)
        for token, lp, top, offset in zip(choice.tokens[start:], choice.logprobs[start:], choice.tops[start:],
                                          choice.offsets[start:]):
            out["tokens"].append(self.strings.get(token))
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(self._top(top, token, lp))
            out["text_offset"].append(shift + offset)
        return out

    def chat_logprobs(self, choice: Choice, start: int) -> dict:
        def entry(token, logprob):
            text = self.strings.get(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

        return {"content": [{**entry(token, lp), "top_logprobs": [entry(t, v) for t, v in top]}
                            for token, lp, top in zip(choice.tokens[start:], choice.logprobs[start:], choice.tops[start:])]}

    def usage(self, generation: Generation) -> dict:
        prompt_tokens = sum(len(p.ids) for p in self.parsed.prompts)
        completion = sum(len(c.tokens) for c in generation.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    def returned(self, generation: Generation) -> list[Choice]:
        """The n choices returned per prompt (the best_of with the highest cumulative logprob), renumbered in order."""
        parsed, out = self.parsed, []
        for p in range(len(parsed.prompts)):
            group = generation.choices[p * parsed.best_of:(p + 1) * parsed.best_of]
            if parsed.best_of > parsed.n:
                group = sorted(group, key=lambda c: -c.cumulative_logprob())[:parsed.n]
            out += group
        return out

    def whole(self, generation: Generation) -> dict:
        parsed, choices = self.parsed, []
        for index, choice in enumerate(self.returned(generation)):
            text = "".join(choice.text)
            item = {"index": index, "finish_reason": choice.finish_reason}
            if parsed.chat:
                item["message"] = {"role": "assistant", "content": text}
                item["logprobs"] = self.chat_logprobs(choice, 0) if parsed.logprobs is not None else None
            else:
                item["text"] = (choice.prompt.text if parsed.echo else "") + text
                item["logprobs"] = self.completion_logprobs(choice, 0, parsed.echo) if parsed.logprobs is not None else None
            item["moa"] = choice.moa()
            choices.append(item)
        return {**self.head, "object": self.object, "choices": choices, "usage": self.usage(generation),
                "moa": generation.choices[0].moa()}

    def chunk(self, choice: Choice, event) -> str | None:
        """The server-sent event for one engine event of a streamed choice (None: nothing to send)."""
        parsed = self.parsed
        index = choice.index // parsed.best_of * parsed.n + choice.index % parsed.best_of
        extra = {}
        if event.kind == "routed":
            extra["moa"] = choice.moa()
            if parsed.chat:
                item = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            else:
                item = {"index": index, "text": choice.prompt.text if parsed.echo else "", "finish_reason": None,
                        "logprobs": self.completion_logprobs(choice, 0, True) if parsed.echo and parsed.logprobs is not None else None}
        elif event.kind == "token":
            if not event.text and parsed.logprobs is None:
                return None
            start = len(choice.tokens) - 1
            if parsed.chat:
                item = {"index": index, "delta": {"content": event.text} if event.text else {}, "finish_reason": None,
                        "logprobs": self.chat_logprobs(choice, start) if parsed.logprobs is not None else None}
            else:
                item = {"index": index, "text": event.text, "finish_reason": None,
                        "logprobs": self.completion_logprobs(choice, start, False) if parsed.logprobs is not None else None}
        else:
            if parsed.chat:
                item = {"index": index, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}
            else:
                item = {"index": index, "text": "", "logprobs": None, "finish_reason": event.finish_reason}
        if parsed.include_usage:
            extra["usage"] = None
        return f"data: {dumps({**self.head, 'object': self.object + ('.chunk' if parsed.chat else ''), 'choices': [item], **extra})}\n\n"

    async def stream(self, generation: Generation):
        """A stream's events: per choice a first chunk once it is routed, a chunk per text delta, one with its finish
        reason; an error event if a choice fails; the usage chunk when asked; then `data: [DONE]`."""
        async for choice, event in generation.events():
            if event.kind == "done" and event.finish_reason == "error":
                yield f"data: {dumps(ApiError(500, f'generation failed: {choice.message}').body())}\n\n"
                break
            chunk = self.chunk(choice, event)
            if chunk is not None:
                yield chunk
        else:
            if self.parsed.include_usage:
                yield f"data: {dumps({**self.head, 'object': self.object + ('.chunk' if self.parsed.chat else ''), 'choices': [], 'usage': self.usage(generation)})}\n\n"
        yield "data: [DONE]\n\n"


def load_for_switch(current: str, path: str, device):
    """The model of saved run `path`, once it is checked to fit the server serving `current`: the same base
    (its base_model.json) and LoRA rank; ApiError 400 for a directory that is no saved run, 409 for one that
    does not fit (the server keeps serving `current`)."""
    from moa import saved_run
    from moa.base_model import load_moa
    from moa.errors import USER_OS_ERRORS, UsageError

    try:
        config, spec = saved_run.read(path)
        old_config, old_spec = saved_run.read(current)
        if spec.to_dict() != old_spec.to_dict():
            raise ApiError(409, f"{short(path)} is a run of another base ({spec.to_dict()}) than the one served "
                                f"({old_spec.to_dict()}): start a server for it", param="model", code="incompatible_run")
        if config.r != old_config.r:
            raise ApiError(409, f"{short(path)} has LoRA rank {config.r}, the served run {old_config.r}: a running "
                                "server switches only between runs of one rank", param="model", code="incompatible_run")
        return load_moa(path, device=device)[0]
    except (UsageError, *USER_OS_ERRORS) as e:
        raise ApiError(400, f"cannot switch to {short(path)}: {short(str(e), 300)}", param="model") from None


def tokenizer_info(tokenizer, context_length: int) -> dict:
    """vLLM's /tokenizer_info: the tokenizer's class, special tokens, context and chat template."""
    return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token, "unk_token": getattr(tokenizer, "unk_token", None),
            "model_max_length": context_length, "chat_template": getattr(tokenizer, "chat_template", None)}


def create_app(engine, tokenizer, *, max_body_bytes: int = 1 << 20, shutdown_timeout: float = 30.0,
               api_key: str | None = None, allowed_origins: list[str] | None = None, body_timeout: float = 30.0,
               run_dir: str | None = None) -> Starlette:
    """The Starlette app serving `engine` (started and shut down with the app's lifespan); `run_dir`, the saved run
    it serves, enables `POST /admin/switch` (with an API key)."""
    from moa import __version__

    serving = {"run_dir": run_dir}
    switching = asyncio.Lock()
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moa-tokenize")  # one tokenizer, one thread

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    async def models(request):
        return models_response(engine.cultures, max_model_len=engine.context_length)

    async def model(request):
        return models_response(engine.cultures, request.path_params["model"], max_model_len=engine.context_length)

    async def switch(request):
        if not api_key or serving["run_dir"] is None:
            raise ApiError(403, "switching runs needs the server started by `moa serve --model RUN_DIR --api-key KEY`",
                           code="switch_disabled")
        body = await read_json(request, max_body_bytes, body_timeout)
        path = body.get("model")
        if not isinstance(path, str) or not path:
            raise ApiError(400, f"'model' must be a saved run directory, got {short(path)}", param="model")
        if switching.locked():
            raise ApiError(409, "a switch to another run is already in progress", code="switch_in_progress")
        async with switching:
            start = time.perf_counter()
            model = await asyncio.to_thread(load_for_switch, serving["run_dir"], path, engine.model.device)
            try:
                await asyncio.to_thread(engine.switch, model)
            except ValueError as e:  # the run lacks the server's fallback culture
                raise ApiError(409, f"cannot switch to {short(path)}: {e}", param="model", code="incompatible_run") from None
            serving["run_dir"] = path
        log.info("switched to %s (%s) in %.1fs", path, ", ".join(engine.cultures), time.perf_counter() - start)
        return JSONResponse({"model": path, "cultures": engine.cultures, "seconds": time.perf_counter() - start})

    async def health(request):
        gauges = engine.scheduler.gauges()
        return JSONResponse({"status": "ok", "queue_depth": gauges["queue_depth"], "running": gauges["running"],
                             "switching": engine.switching})

    async def metrics_text(request):
        return PlainTextResponse(engine.render_metrics(), media_type="text/plain; version=0.0.4")

    async def version(request):
        return JSONResponse({"version": __version__})

    async def info(request):
        return JSONResponse(tokenizer_info(tokenizer, engine.context_length))

    async def tokenize(request):
        body = await read_json(request, max_body_bytes, body_timeout)
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise ApiError(400, f"'add_special_tokens' must be a boolean, got {short(special)}", param="add_special_tokens")
        if "messages" in body:
            ids = (await off_loop(chat_prompt, body, tokenizer)).ids
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise ApiError(400, f"'prompt' must be a string, got {short(prompt)}", param="prompt")
            ids = await off_loop(lambda: text_ids(tokenizer, prompt) if special else
                                 tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return JSONResponse({"count": len(ids), "max_model_len": engine.context_length, "tokens": ids, "token_strs": None})

    async def detokenize(request):
        body = await read_json(request, max_body_bytes, body_timeout)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < engine.vocab_size
                                                for t in ids):
            raise ApiError(400, f"'tokens' must be a list of token ids in 0..{engine.vocab_size - 1}, got {short(ids)}",
                           param="tokens")
        return JSONResponse({"prompt": await off_loop(tokenizer.decode, ids)})

    def endpoint(chat: bool):
        async def handle(request):
            request_id = request.scope["state"]["request_id"]
            try:
                body = await read_json(request, max_body_bytes, body_timeout)
                parsed = await off_loop(parse, body, chat, tokenizer, engine.cultures, engine.context_length, engine.vocab_size,
                                        request.headers.get("accept-language"))
                generation = Generation(engine, parsed, request_id)
            except ApiError as e:
                engine.metrics.reject(e.status)
                return error_response(e)
            head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}", "created": int(time.time()),
                    "model": parsed.model}
            responses = Responses(tokenizer, parsed, head)
            if parsed.stream:
                return StreamingResponse(responses.stream(generation), media_type="text/event-stream")
            watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
            try:
                async for _ in generation.events():
                    pass
            finally:
                watcher.cancel()
            failed = generation.failed()
            if failed is not None:
                return error_response(ApiError(500, f"generation failed: {failed.message}"))
            return JSONResponse(await off_loop(responses.whole, generation))

        return handle

    async def api_error(request, e: ApiError):
        return error_response(e)

    async def http_error(request, e: HTTPException):
        return error_response(ApiError(e.status_code, f"{request.method} {short(request.url.path)}: {e.detail}"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)
        tokenizing.shutdown()

    routes = [Route("/v1/models", models), Route("/v1/models/{model:path}", model), Route("/health", health),
              Route("/metrics", metrics_text), Route("/version", version), Route("/tokenizer_info", info),
              Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
              Route("/admin/switch", switch, methods=["POST"]),
              Route("/v1/completions", endpoint(chat=False), methods=["POST"]),
              Route("/v1/chat/completions", endpoint(chat=True), methods=["POST"])]
    return build(routes, lifespan, api_key, allowed_origins, {ApiError: api_error, HTTPException: http_error})


def build(routes, lifespan, api_key, allowed_origins, handlers) -> Starlette:
    """A Starlette app with `guard` around its routes and, when origins are given, CORS outside it."""
    middleware = [Middleware(lambda app: guard(app, api_key))]
    if allowed_origins:
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                                        allow_headers=["Authorization", "Content-Type", "X-Request-Id"]))
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware, exception_handlers=handlers)
