"""Serve a saved MoA run over the OpenAI API, or run its router in front of an upstream server.

Usage: moa serve --model RUN_DIR [--host 127.0.0.1] [--port 8000] [--max-batch-size 32] [--max-cache-tokens N]
[--max-queue N] [--shutdown-timeout 30] [--max-body-bytes 1048576]: every culture is a model id (plus `auto`,
the router picks, and `base`, no adapter) of /v1/completions and /v1/chat/completions, batched
continuously by one engine; /health and /metrics (Prometheus). With --upstream URL only the router runs
here: each request's culture is picked (a request naming a culture keeps it) and the request is forwarded
to URL, an OpenAI-compatible server that serves each culture under its name (vLLM with --lora-modules
from `moa export --format vllm`, or another `moa serve`). --port 0 picks a free port. The address is
printed once the server accepts connections. SIGTERM: no new connections, requests in flight finish
within --shutdown-timeout, exit 0.
"""
from __future__ import annotations

import argparse
import signal
import socket

from moa.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved MoA run directory (moa_config.json, moa_adapters.safetensors, base_model.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--upstream", default=None,
                        help="run only the router and forward each request, its culture picked, to this OpenAI-compatible base URL "
                             "(e.g. http://127.0.0.1:8001, serving each culture under its name)")
    parser.add_argument("--upstream-timeout", type=float, default=60.0, help="seconds to wait for the upstream (with --upstream)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests in the running batch at most")
    parser.add_argument("--max-cache-tokens", type=int, default=None,
                        help="size of the running batch's KV cache in tokens: --max-batch-size rows of "
                             "max-cache-tokens / max-batch-size tokens each, which a request's prompt + max_tokens must fit; "
                             "default: the engine's (65536)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="requests waiting for a slot at most; past it the server answers 429; default: the engine's")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds requests in flight get to finish after SIGTERM")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (larger: 413)")


def _engine_settings(args) -> dict:
    settings = {"max_batch_size": args.max_batch_size}
    if args.max_cache_tokens is not None:
        settings["max_cache_tokens"] = args.max_cache_tokens
    if args.max_queue is not None:
        settings["max_queue"] = args.max_queue
    return settings


def _ignore(signum, frame) -> None:
    """uvicorn re-raises the signal it stopped on once it has shut down; this handler makes that a clean exit."""


def run(args) -> int:
    import uvicorn

    from moa.base_model import load_moa, resolve_device

    if args.max_body_bytes < 1:
        raise UsageError(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
    model, tokenizer = load_moa(args.model, device=resolve_device(args.device))
    if args.upstream is not None:
        from moa.serve.front import create_front
        app = create_front(model, tokenizer, args.upstream, timeout_s=args.upstream_timeout,
                           max_body_bytes=args.max_body_bytes)
    else:
        from moa.serve.app import create_app
        from moa.serve.engine import Engine
        try:
            engine = Engine(model, tokenizer, **_engine_settings(args))
        except ValueError as e:
            raise UsageError(f"engine settings: {e}") from None
        app = create_app(engine, tokenizer, max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout)
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    what = f"router front for {args.upstream}" if args.upstream is not None else f"{len(model.config.cultures)} cultures"
    print(f"moa serve: {what} on http://{host}:{port}", flush=True)
    server.run(sockets=[sock])
    return 0
