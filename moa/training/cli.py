"""Train culture adapters and the router: `moa train CONFIG.yaml` (one process) or, distributed,
`torchrun --nproc_per_node N -m moa.training CONFIG.yaml --deepspeed configs/deepspeed/zero3.json`
(`deepspeed --num_gpus N -m moa.training ...` works too). Same arguments either way.

The config is validated and every data file read before any model is built. `KEY=VALUE` arguments
after the config set its keys (`moa train cfg.yaml optim.weight_decay=0.01 stages.0.steps=100`).
Outputs under the output directory: train_config.json (the config in use), metrics.jsonl, metrics.png, checkpoints/step_N/ and final/ (adapters and
routers as safetensors, moa_config.json, base_model.json; load with moa.base_model.load_moa).
The output directory must be new or empty, or an earlier run with --resume; --overwrite replaces
anything else (never a directory holding the run's inputs or the current directory).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from moa.cli import run_verb


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("config", help="training YAML, e.g. configs/train/tiny-cpu.yaml (a path under configs/ that "
                                       "does not exist here names the copy installed with moa)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="set config keys, dotted (optim.weight_decay=0.01 stages.0.steps=100 moa.r=8), values read "
                             "as YAML; checked like the file")
    parser.add_argument("--output-dir", help="overrides the config's output_dir")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON config, e.g. configs/deepspeed/zero3.json (found as the "
                                            "config is); overrides the config's 'deepspeed'")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (over all stages)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in the output dir")
    parser.add_argument("--overwrite", action="store_true", help="delete what the output dir holds (an earlier run, other "
                                                                 "files) and start afresh")
    parser.add_argument("--seed", type=int, help="overrides the config's seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher


RESUME_HINT = "rerun the same command with --resume to continue from the latest complete checkpoint"
RUN_MARKER = "train_config.json"  # written at the start of every run


def run(args) -> int:
    from moa.atomic import check_output_dir
    from moa.errors import UsageError
    from moa.resources import config_file

    from .config import TrainConfig

    path = config_file(args.config)
    config = TrainConfig.from_file(path, args.overrides)
    if args.deepspeed:
        config.deepspeed = str(config_file(args.deepspeed))
    if args.seed is not None:
        config.seed = args.seed
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in the output dir and --overwrite deletes it: pass one of them")
    hint = "pass --overwrite to delete it" + ("" if args.resume else " or --resume to continue the run in it")
    output_dir = check_output_dir(args.output_dir or config.output_dir, RUN_MARKER if args.resume else None,
                                  inputs=[path, *config.input_paths()], overwrite=args.overwrite, hint=hint,
                                  replace=args.overwrite)
    if args.overwrite and output_dir.exists() and os.environ.get("RANK", "0") == "0":
        shutil.rmtree(output_dir)
    from .trainer import Trainer

    trainer = Trainer(config, output_dir=output_dir, max_steps=args.max_steps, resume=args.resume,
                      show_progress=not args.no_progress)
    final = trainer.run()
    if trainer.rank == 0:
        print(f"adapters and router: {final}")
        print(f"metrics: {final.parent / 'metrics.jsonl'} and {final.parent / 'metrics.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_verb(sys.modules[__name__], parser.parse_args(argv))
