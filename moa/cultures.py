"""List a saved run's cultures, or write a run without some of them.

Usage: moa cultures --model RUN_DIR lists the run's cultures in id order. moa cultures --model RUN_DIR
--remove NAME [--remove NAME ...] --output-dir OUT writes OUT, a saved run of the other cultures:
their adapters and gate rows as they are, the removed cultures' slots and gate rows gone, the
router's shared weights unchanged, so every prompt the router did not route to a removed culture is
routed as before. To add a culture, or retrain one with the others frozen, train with `init_from`
(see `moa train`).
"""
from __future__ import annotations

import argparse

from moa import saved_run
from moa.atomic import check_output_dir
from moa.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved MoA run directory")
    parser.add_argument("--remove", action="append", default=[], metavar="NAME", help="a culture to leave out (repeatable)")
    parser.add_argument("--output-dir", default=None, help="where to write the run without the removed cultures")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier saved run at --output-dir")


def run(args) -> int:
    from moa.base_model import load_tokenizer

    config, base_spec = saved_run.read(args.model)
    if not args.remove:
        print("\n".join(config.cultures))
        return 0
    if args.output_dir is None:
        raise UsageError("--remove needs --output-dir: where to write the run without those cultures")
    unknown = [c for c in args.remove if c not in config.cultures]
    if unknown:
        raise UsageError(f"--remove {unknown}: the run's cultures are {config.cultures}")
    kept = [c for c in config.cultures if c not in args.remove]
    if not kept:
        raise UsageError(f"--remove names every culture of the run ({config.cultures}): a run keeps at least one")
    out = check_output_dir(args.output_dir, saved_run.CONFIG_NAME, inputs=[args.model], overwrite=args.overwrite)
    new_config, weights = saved_run.select_cultures(config, saved_run.read_weights(args.model, config), kept)
    saved_run.save(out, new_config, weights, base_spec, tokenizer=load_tokenizer(base_spec))
    print(f"{len(kept)} cultures ({', '.join(kept)}) -> {out}")
    return 0
