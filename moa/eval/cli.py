"""Evaluate a saved MoA run on labelled test rows (JSONL, see docs/data.md).

Methods: base (no adapter), prompting (base model, prompt naming the culture), shared_lora (with
--shared: a run whose only culture is "shared"), moa_oracle (each row's own adapter) and
moa_router (the router picks). Label tasks are scored by the log-probability of every label as the
response; `open` rows count for routing only. Prints a markdown table and writes OUTPUT/results.md,
OUTPUT/results.json, OUTPUT/accuracy.png, OUTPUT/confusion.png and OUTPUT/routing_by_position.png.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved MoA run directory (moa_config.json, adapters, base_model.json)")
    parser.add_argument("--data", required=True, help="test rows, JSONL (e.g. stage2_test.jsonl)")
    parser.add_argument("--shared", help="saved shared-LoRA run directory (one culture named 'shared')")
    parser.add_argument("--output-dir", default="eval_results", help="where to write results and plots")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences (rows x labels) per forward")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence (prompt end and response kept)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N rows")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    import torch

    from moa.base_model import load_moa
    from moa.data import CULTURES, load_jsonl
    from moa.eval.report import format_markdown, write_report
    from moa.eval.scoring import evaluate

    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_moa(args.model, device)
        shared = load_moa(args.shared, device)[0] if args.shared else None
        known = list(CULTURES) + [c for c in model.config.cultures if c not in CULTURES]
        rows = load_jsonl(args.data, cultures=known)[:args.limit]
        results = evaluate(model, tokenizer, rows, shared_model=shared, batch_size=args.batch_size,
                           max_length=args.max_length, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"moa eval: error: {e}", file=sys.stderr)
        return 2
    paths = write_report(results, args.output_dir)
    print(format_markdown(results))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
