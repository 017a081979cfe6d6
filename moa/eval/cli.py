"""Evaluate a saved MoA run on labelled test rows (JSONL, see docs/data.md).

Methods: base (no adapter), prompting (base model, prompt naming the culture), shared_lora (with
--shared: a run whose only culture is "shared"), moa_oracle (each row's own adapter) and
moa_router (the router picks when its probability of its pick is at least --min-router-confidence; below
it the row's `culture_hint` or `locale` runs, else --fallback-culture or the base model; the abstention
rate and the accuracy of the abstained rows are their own columns). Label tasks are scored by the log-probability of every label as the
response; `open` rows count for routing only. Prints a markdown table and writes OUTPUT/results.md,
OUTPUT/results.json, OUTPUT/accuracy.png, OUTPUT/confusion.png and OUTPUT/routing_by_position.png;
OUTPUT must be new, empty or an earlier eval output (else --overwrite), checked before the run.
"""
from __future__ import annotations

import argparse

from moa.errors import UsageError
from moa.infer import culture_choice
from moa.infer.culture_choice import check_min_confidence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved MoA run directory (moa_config.json, adapters, base_model.json)")
    parser.add_argument("--data", required=True, help="test rows, JSONL (e.g. stage2_test.jsonl)")
    parser.add_argument("--shared", help="saved shared-LoRA run directory (one culture named 'shared')")
    parser.add_argument("--output-dir", default="eval_results", help="where to write results and plots: a new or empty "
                                                                     "directory or an earlier eval output")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output-dir that holds other files")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences (rows x labels) per forward")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence (prompt end and response kept)")
    culture_choice.add_arguments(parser, "moa_router, on a row,")
    parser.add_argument("--limit", type=int, help="evaluate only the first N rows")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    from moa.atomic import check_output_dir
    from moa.base_model import load_moa, resolve_device
    from moa.data import CULTURES, load_jsonl
    from moa.eval.report import format_markdown, write_report
    from moa.eval.scoring import evaluate

    check_output_dir(args.output_dir, "results.json", inputs=[args.model] + ([args.shared] if args.shared else []),
                     overwrite=args.overwrite, replace=False)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_min_confidence(args.min_router_confidence)
    device = resolve_device(args.device)
    model, tokenizer = load_moa(args.model, device)
    shared = load_moa(args.shared, device)[0] if args.shared else None
    known = list(CULTURES) + [c for c in model.config.cultures if c not in CULTURES]
    rows = load_jsonl(args.data, cultures=known)[:args.limit]
    results = evaluate(model, tokenizer, rows, shared_model=shared, batch_size=args.batch_size,
                       max_length=args.max_length, progress=not args.no_progress,
                       min_router_confidence=args.min_router_confidence, fallback_culture=args.fallback_culture)
    paths = write_report(results, args.output_dir)
    print(format_markdown(results))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
