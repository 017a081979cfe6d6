"""Generate for a JSONL file of prompts with a saved MoA run; rows of one batch may use different cultures.

Usage: moa generate --model RUN_DIR --prompts PROMPTS.jsonl --output OUT.jsonl [--routing prompt|router|oracle|topk]
[--top-k N] [--batch-size 16] [--max-new-tokens 64] [--do-sample --temperature 1.0 --top-p 1.0] [--seed 0]
[--min-router-confidence 0.5] [--fallback-culture NAME].
Each input line is {"prompt": ..., "culture": optional culture name, "id": optional, "culture_hint": optional
culture name, "locale": optional language tag}; 'oracle' routing needs a culture on every row, 'prompt'
(the default) runs each row with the adapter the router picks for its prompt when the router gives it at
least --min-router-confidence, else the row's hint (culture_hint, else locale through the locale table),
else --fallback-culture (default: the base model); 'router' and 'topk' let the gates choose per token. Each
output line, in input order, is {"id", "prompt", "culture" (given or null), "text" (the new tokens, special
tokens skipped), "routed_culture" (the culture that ran the row, "base" for the base model: the given
culture under 'oracle', the decided one under 'prompt', the router's choice for the prompt under 'router'
and 'topk'), "decided_by" (request, router, hint or fallback), "router_confidence" (the router's probability
for its choice, in every mode), "router_choice", "new_tokens"}. The output is written under a temporary name and renamed; the
throughput (new tokens / wall time) is printed. --output must be new or an earlier output of
generate (else --overwrite); a prompt longer than the context minus --max-new-tokens is refused
(or, with --truncate left, keeps its last tokens).
"""
from __future__ import annotations

import argparse
import time

from moa.errors import UsageError
from moa.infer import culture_choice
from moa.infer.culture_choice import DEFAULT_MIN_CONFIDENCE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved MoA run directory (moa_config.json, moa_adapters.safetensors, base_model.json)")
    parser.add_argument("--prompts", required=True, help="input JSONL: {\"prompt\", \"culture\" (optional), \"id\" (optional)} per line")
    parser.add_argument("--output", required=True, help="output JSONL, one line per input row in input order; new or an "
                                                        "earlier output of generate")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output file that generate did not write")
    parser.add_argument("--routing", default="prompt", choices=["prompt", "router", "oracle", "topk"],
                        help="'prompt': the router's pick for the prompt runs the whole row; 'oracle': each row's given "
                             "culture; 'router': the gate's top-1 per token; 'topk': mix of the top-k")
    culture_choice.add_arguments(parser, "with --routing prompt, a row", default=None)
    parser.add_argument("--top-k", type=int, default=None, help="adapters mixed per token under --routing topk (default: the run's top_k)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per row at most")
    parser.add_argument("--truncate", choices=["left"], help="cut a prompt longer than the context minus --max-new-tokens "
                                                             "to its last tokens (default: refuse it)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --do-sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of sampling")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    import torch

    from moa.atomic import check_output_file
    from moa.base_model import load_moa, resolve_device
    from moa.data import write_jsonl
    from moa.infer.generate import generate_rows, read_prompts, sampling_kwargs

    for flag in ("min_router_confidence", "fallback_culture"):
        if getattr(args, flag) is not None and args.routing != "prompt":
            raise UsageError(f"--{flag.replace('_', '-')} applies to --routing prompt only, got --routing {args.routing}")
    check_output_file(args.output, '"routed_culture"', inputs=[args.model, args.prompts], overwrite=args.overwrite)
    sampling = sampling_kwargs(args.do_sample, args.temperature, args.top_p)
    device = resolve_device(args.device)
    model, tokenizer = load_moa(args.model, device=device)
    rows = read_prompts(args.prompts, model.config.cultures, args.routing)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    results = generate_rows(model, tokenizer, rows, routing=args.routing, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, top_k=args.top_k, progress=not args.no_progress,
                            truncate=args.truncate, fallback_culture=args.fallback_culture,
                            min_router_confidence=(DEFAULT_MIN_CONFIDENCE if args.min_router_confidence is None
                                                   else args.min_router_confidence), **sampling)
    seconds = time.perf_counter() - start
    write_jsonl(args.output, results)
    new_tokens = sum(r["new_tokens"] for r in results)
    print(f"{len(results)} rows, {new_tokens} new tokens in {seconds:.2f}s ({new_tokens / max(seconds, 1e-9):.1f} tokens/s) "
          f"-> {args.output}")
    return 0
