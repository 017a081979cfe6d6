"""The router front of `moa serve --upstream URL`: route each request here, generate upstream.

Only the router runs in this process: `model.route_sequences` reads the token embeddings and the
per-layer gates, no decoder layer. A request for `auto` gets its culture by the rule `moa serve` applies
(moa.infer.culture_choice.decide: the router's pick for its prompt, tokenized as `moa serve` does, when
its confidence is at least `min_router_confidence`, else the request's hint, from its `moa` field or
Accept-Language header, else `fallback_culture` or the base model); a request naming a culture (or
`base`) keeps it. The body is forwarded unchanged but for `model` (the culture, or `base`, the base
model's name in vLLM's command from `moa export --format vllm`) and without `moa` to the same path under
URL, any OpenAI-compatible server that serves each culture under its name; its answer comes back as it
is, a stream chunk by chunk, with `"moa": {"culture", "router_confidence", "decided_by"}` added to the
response or to the stream's first chunk.
Upstream failures become OpenAI-style errors: unreachable 503, timed out 504, a 5xx or a broken
answer 502. Upstream 4xx answers (the client's errors, 429 included) pass through. The client's
`Authorization` header goes upstream with the request (or `upstream_api_key` where given), so an
upstream vLLM started with `--api-key` accepts it; `api_key` guards this front as it does `moa serve`.
A request for `auto` holds one prompt (the router picks one culture per upstream request).
"""
from __future__ import annotations

import contextlib
import json

import httpx2
import torch
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moa.infer.culture_choice import DEFAULT_MIN_CONFIDENCE, CultureDecision, check_fallback, check_min_confidence, decide
from moa.serve.app import build, dumps, error_response, models_response, read_json
from moa.serve.openai_protocol import ApiError, chat_prompt, check_model, completion_prompts, culture_hint


def create_front(model, tokenizer, upstream: str, *, timeout_s: float = 60.0, max_body_bytes: int = 1 << 20,
                 api_key: str | None = None, upstream_api_key: str | None = None, allowed_origins: list[str] | None = None,
                 body_timeout: float = 30.0, min_router_confidence: float = DEFAULT_MIN_CONFIDENCE,
                 fallback_culture: str | None = None) -> Starlette:
    """The Starlette app routing requests with `model`'s router and forwarding them to `upstream`."""
    cultures = list(model.config.cultures)
    min_confidence = check_min_confidence(min_router_confidence, "min_router_confidence")
    fallback = check_fallback(fallback_culture, cultures)
    upstream = upstream.rstrip("/").removesuffix("/v1")
    client = httpx2.AsyncClient(timeout=timeout_s)

    def route(body: dict, chat: bool, accept_language: str | None) -> CultureDecision:
        """The request's culture (None: the base model), the router's confidence in its pick (None for a culture
        named by the request) and what decided it."""
        name = check_model(body, cultures)
        hint = culture_hint(body, cultures, accept_language)
        if name != "auto":
            return CultureDecision(None if name == "base" else name, None, "request")
        if chat:
            ids = chat_prompt(body, tokenizer).ids
        else:
            prompts = completion_prompts(body, tokenizer, model.base_model.config.vocab_size)
            if len(prompts) > 1:
                raise ApiError(400, "'prompt' holds several prompts: the router front routes one prompt per 'auto' request",
                               param="prompt")
            ids = prompts[0].ids
        culture, confidence = model.route_sequences(torch.tensor([ids], device=model.device))
        return decide(cultures[int(culture[0])], float(confidence[0]), hint, min_confidence, fallback)

    def upstream_error(e: Exception) -> ApiError:
        if isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout)):
            return ApiError(503, f"upstream {upstream} is not reachable: {type(e).__name__}: {e}")
        if isinstance(e, httpx2.TimeoutException):
            return ApiError(504, f"upstream {upstream} did not answer within {timeout_s}s ({type(e).__name__})")
        return ApiError(502, f"upstream {upstream} failed: {type(e).__name__}: {e}")

    async def passthrough(answer: httpx2.Response, moa: dict):
        """The upstream's event stream line by line, `moa` added to its first data chunk."""
        first = True
        try:
            async for line in answer.aiter_lines():
                if first and line.startswith("data: {"):
                    line = "data: " + dumps({**json.loads(line[len("data: "):]), "moa": moa})
                    first = False
                yield line + "\n"
        except httpx2.HTTPError as e:
            yield f"data: {dumps(upstream_error(e).body())}\n\n"
        finally:
            await answer.aclose()

    def endpoint(chat: bool, path: str):
        async def handle(request):
            try:
                body = await read_json(request, max_body_bytes, body_timeout)
                moa = route(body, chat, request.headers.get("accept-language")).fields()
                auth = f"Bearer {upstream_api_key}" if upstream_api_key else request.headers.get("authorization")
                forwarded = {key: value for key, value in body.items() if key != "moa"}
                outgoing = client.build_request("POST", upstream + path, json={**forwarded, "model": moa["culture"]},
                                                headers={"Authorization": auth} if auth else None)
                try:
                    answer = await client.send(outgoing, stream=True)
                except httpx2.HTTPError as e:
                    raise upstream_error(e) from None
                if answer.status_code >= 500:
                    text = (await answer.aread()).decode(errors="replace")[:500]
                    await answer.aclose()
                    raise ApiError(502, f"upstream {upstream} answered {answer.status_code}: {text}")
            except ApiError as e:
                return error_response(e)
            if answer.status_code >= 400:
                content = await answer.aread()
                await answer.aclose()
                headers = {k: v for k, v in answer.headers.items() if k.lower() == "retry-after"}
                return Response(content, status_code=answer.status_code, headers=headers,
                                media_type=answer.headers.get("content-type"))
            if body.get("stream") is True:
                return StreamingResponse(passthrough(answer, moa), media_type="text/event-stream")
            try:
                result = json.loads(await answer.aread())
            except (httpx2.HTTPError, ValueError) as e:
                return error_response(upstream_error(e))
            finally:
                await answer.aclose()
            return JSONResponse({**result, "moa": moa})

        return handle

    async def models(request):
        return models_response(cultures)

    async def health(request):
        return JSONResponse({"status": "ok", "upstream": upstream})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    async def api_error(request, e: ApiError):
        return error_response(e)

    routes = [Route("/v1/models", models), Route("/health", health),
              Route("/v1/completions", endpoint(False, "/v1/completions"), methods=["POST"]),
              Route("/v1/chat/completions", endpoint(True, "/v1/chat/completions"), methods=["POST"])]
    return build(routes, lifespan, api_key, allowed_origins, {ApiError: api_error})
