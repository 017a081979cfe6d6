"""`moa demo`'s arguments, and the run they ask for."""
from __future__ import annotations

import argparse

from .config import DEFAULT_CONFIG


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", help="where every phase writes (replaced phase by phase): "
                                                                  "a new or empty directory or an earlier demo's")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output-dir that holds other files")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthesis, initialisation and training")
    parser.add_argument("--quick", action="store_true", help="a small version (about 2 minutes; no quality targets)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo config YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="set config keys, dotted (pretrain.steps=100 train.stages.1.lr=1e-3), values read as YAML")
    parser.add_argument("--test-split", choices=("rows", "norms"), default=None,
                        help="override synth.test_split: 'rows' (unseen questions about trained customs) or 'norms' "
                             "(customs never trained on)")
    parser.add_argument("--stage-ablation", action="store_true",
                        help="also train MoA on stage 2 alone for the same total steps and report both (after the "
                             "demo's phases)")
    parser.add_argument("--add-culture", nargs="+", metavar="CULTURE",
                        help="the growth experiment, after the demo's phases: for each culture named, train MoA on the "
                             "others, add it to that run (init_from) and compare with the joint model (OUT/grow.json, "
                             "OUT/grow.md); put KEY=VALUE arguments before it")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    from moa.atomic import check_output_dir

    from .pipeline import run_demo

    check_output_dir(args.output_dir, "data/work/state.json", inputs=[args.config], overwrite=args.overwrite,
                     replace=False)
    run_demo(args.output_dir, seed=args.seed, quick=args.quick, progress=not args.no_progress, config_path=args.config,
             test_split=args.test_split, stage_ablation=args.stage_ablation, overrides=args.overrides,
             add_cultures=args.add_culture or ())
    return 0
