"""Train culture adapters and the router: `moa train CONFIG.yaml` (one process) or, distributed,
`torchrun --nproc_per_node N -m moa.training CONFIG.yaml --deepspeed configs/deepspeed/zero3.json`
(`deepspeed --num_gpus N -m moa.training ...` works too). Same arguments either way.

The config is validated and every data file read before any model is built. Outputs under the
output directory: metrics.jsonl, metrics.png, checkpoints/step_N/ and final/ (adapters and
routers as safetensors, moa_config.json, base_model.json; load with moa.base_model.load_moa).
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("config", help="training YAML, e.g. configs/train/tiny-cpu.yaml (a path under configs/ that "
                                       "does not exist here names the copy installed with moa)")
    parser.add_argument("--output-dir", help="overrides the config's output_dir")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON config, e.g. configs/deepspeed/zero3.json (found as the "
                                            "config is); overrides the config's 'deepspeed'")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (over all stages)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in the output dir")
    parser.add_argument("--seed", type=int, help="overrides the config's seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def run(args) -> int:
    from moa.resources import config_file

    from .config import TrainConfig

    try:
        config = TrainConfig.from_file(config_file(args.config))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.deepspeed:
        config.deepspeed = str(config_file(args.deepspeed))
    if args.seed is not None:
        config.seed = args.seed
    from .trainer import Trainer

    try:
        trainer = Trainer(config, output_dir=args.output_dir, max_steps=args.max_steps, resume=args.resume,
                          show_progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    final = trainer.run()
    if trainer.rank == 0:
        print(f"adapters and router: {final}")
        print(f"metrics: {final.parent / 'metrics.jsonl'} and {final.parent / 'metrics.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
