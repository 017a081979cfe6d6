"""Serve a saved MoA run over the OpenAI API, or run its router in front of an upstream server.

Usage: moa serve --model RUN_DIR [--host 127.0.0.1] [--port 8000] [--max-batch-size 32] [--max-cache-tokens N]
[--max-model-len N] [--max-queue N] [--shutdown-timeout 30] [--max-body-bytes 1048576] [--api-key KEY]
[--allowed-origins URL,...] [--header-timeout 10] [--body-timeout 30] [--min-router-confidence 0.5]
[--fallback-culture NAME]: every culture is a model id (plus `auto` and `base`, no adapter) of
/v1/completions and /v1/chat/completions, batched continuously by one engine. `auto` runs the router's
pick when its confidence is at least --min-router-confidence, else the request's culture hint (the
body's `moa: {"culture_hint"}` or `{"locale"}`, else its Accept-Language header), else
--fallback-culture (default: the base model); /health and /metrics (Prometheus). With --upstream URL only
the router runs here: each request's culture is decided by the same rule (a request naming a culture
keeps it) and the request is forwarded to URL, an OpenAI-compatible server that serves each culture under its name (vLLM with --lora-modules
from `moa export --format vllm`, or another `moa serve`). --port 0 picks a free port. The address is
printed once the server accepts connections. SIGTERM: no new connections, requests in flight finish
within --shutdown-timeout (those still running then end with an error, a stream with an error event
and [DONE]), exit 0. --api-key (or MOA_API_KEY) makes /v1/* and the tokenizer endpoints require
`Authorization: Bearer KEY`; the front forwards the client's Authorization header upstream, or
--upstream-api-key (MOA_UPSTREAM_API_KEY) when given. Flags named as vLLM's mean what they mean there:
--host, --port, --api-key, --max-model-len, --max-num-seqs (= --max-batch-size), --allowed-origins. With --api-key, `POST
/admin/switch {"model": RUN_DIR}` switches to another saved run of the same base and rank without a
restart: requests in flight finish on the weights they started with, the ones arriving meanwhile wait,
then /v1/models lists the new run's cultures.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket

from moa.errors import UsageError
from moa.infer import culture_choice
from moa.infer.culture_choice import check_fallback, check_min_confidence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved MoA run directory (moa_config.json, moa_adapters.safetensors, base_model.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--upstream", default=None,
                        help="run only the router and forward each request, its culture picked, to this OpenAI-compatible base URL "
                             "(e.g. http://127.0.0.1:8001, serving each culture under its name)")
    parser.add_argument("--upstream-timeout", type=float, default=60.0, help="seconds to wait for the upstream (with --upstream)")
    parser.add_argument("--upstream-api-key", default=os.environ.get("MOA_UPSTREAM_API_KEY"),
                        help="API key sent upstream (default: MOA_UPSTREAM_API_KEY, else the client's own Authorization header)")
    parser.add_argument("--api-key", default=os.environ.get("MOA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* and the tokenizer endpoints (default: MOA_API_KEY; "
                             "/health and /metrics stay open)")
    parser.add_argument("--allowed-origins", default=None,
                        help="comma-separated origins allowed by CORS (e.g. https://app.example.com); none by default")
    parser.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send a request's headers")
    parser.add_argument("--body-timeout", type=float, default=30.0, help="seconds a client has to send a request's body")
    parser.add_argument("--max-batch-size", "--max-num-seqs", dest="max_batch_size", type=int, default=32,
                        help="requests in the running batch at most (vLLM: --max-num-seqs)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="the most tokens, prompt and new, a request may hold (default: the model's context, or less "
                             "where --max-cache-tokens / --max-batch-size is smaller)")
    parser.add_argument("--max-cache-tokens", type=int, default=None,
                        help="size of the running batch's KV cache in tokens: --max-batch-size rows of "
                             "max-cache-tokens / max-batch-size tokens each, which a request's prompt + max_tokens must fit; "
                             "default: the engine's (65536)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="requests waiting for a slot at most; past it the server answers 429; default: the engine's")
    culture_choice.add_arguments(parser, "an `auto` request")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds requests in flight get to finish after SIGTERM")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (larger: 413)")


def _engine_settings(args) -> dict:
    settings = {"max_batch_size": args.max_batch_size, "min_router_confidence": args.min_router_confidence,
                "fallback_culture": args.fallback_culture}
    if args.max_cache_tokens is not None:
        settings["max_cache_tokens"] = args.max_cache_tokens
    if args.max_queue is not None:
        settings["max_queue"] = args.max_queue
    if args.max_model_len is not None:
        settings["max_model_len"] = args.max_model_len
    return settings


def _ignore(signum, frame) -> None:
    """uvicorn re-raises the signal it stopped on once it has shut down; this handler makes that a clean exit."""


def run(args) -> int:
    from moa.base_model import load_moa, resolve_device
    from moa.serve.http_server import serve

    for name in ("max_body_bytes", "header_timeout", "body_timeout", "shutdown_timeout"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty: give a key, or leave it (and MOA_API_KEY) unset to serve without one")
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()] if args.allowed_origins else None
    check_min_confidence(args.min_router_confidence)
    model, tokenizer = load_moa(args.model, device=resolve_device(args.device))
    check_fallback(args.fallback_culture, list(model.config.cultures))
    on_exit = None
    if args.upstream is not None:
        from moa.serve.front import create_front
        app = create_front(model, tokenizer, args.upstream, timeout_s=args.upstream_timeout, max_body_bytes=args.max_body_bytes,
                           api_key=args.api_key, upstream_api_key=args.upstream_api_key, allowed_origins=origins,
                           body_timeout=args.body_timeout, min_router_confidence=args.min_router_confidence,
                           fallback_culture=args.fallback_culture)
    else:
        from moa.serve.app import create_app
        from moa.serve.engine import Engine
        try:
            engine = Engine(model, tokenizer, **_engine_settings(args))
        except ValueError as e:
            raise UsageError(f"engine settings: {e}") from None
        app = create_app(engine, tokenizer, max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
                         api_key=args.api_key, allowed_origins=origins, body_timeout=args.body_timeout,
                         run_dir=args.model)
        on_exit = lambda: engine.shutdown(args.shutdown_timeout)  # noqa: E731
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    host, port = sock.getsockname()[:2]
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("moa.serve").addHandler(handler)
    logging.getLogger("moa.serve").setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    what = f"router front for {args.upstream}" if args.upstream is not None else f"{len(model.config.cultures)} cultures"
    print(f"moa serve: {what} on http://{host}:{port}", flush=True)
    serve(app, sock, shutdown_timeout=args.shutdown_timeout, header_timeout=args.header_timeout, on_exit=on_exit)
    return 0
