"""Synthesize task-aware cultural training data from a config (configs/synth/*.yaml).

`KEY=VALUE` arguments after the config set its keys (`moa synth CONFIG samples_per_task=12`). Writes
OUTPUT/synth_config.json (the config in use), OUTPUT/stage1_{train,validation}.jsonl,
OUTPUT/stage2_{train,validation,test}.jsonl and OUTPUT/summary.json (with summary.png), prints a culture x task table of valid samples and
rejects. A rerun with the same config resumes: finished jobs are skipped and LLM calls come from
the cache in OUTPUT/work/. OUTPUT must be new, empty or an earlier synth output (else --overwrite).
"""
from __future__ import annotations

import argparse
import json
import sys

from moa.cli import run_verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="synthesis config YAML, e.g. configs/synth/offline.yaml (a path under configs/ "
                                       "that does not exist here names the copy installed with moa)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="set config keys, dotted (samples_per_task=12 cultures=[japan,india] llm.temperature=0.5), "
                             "values read as YAML; checked like the file")
    parser.add_argument("--output-dir", help="where to write (default: the config's output_dir)")
    parser.add_argument("--fresh", action="store_true", help="discard an earlier run in the output dir")
    parser.add_argument("--overwrite", action="store_true", help="write into an output dir that holds other files")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


RESUME_HINT = "rerun the same command to resume (finished jobs are kept, LLM calls come from the cache)"


def run(args) -> int:
    from moa.atomic import check_output_dir
    from moa.resources import config_file
    from moa.synth.config import load_config
    from moa.synth.pipeline import run as run_pipeline
    from moa.synth.report import format_table, plot_counts

    path = config_file(args.config)
    cfg = load_config(path, args.overrides, output_dir=args.output_dir)
    check_output_dir(cfg.output_dir, "work/state.json", inputs=[path, cfg.task_dir], overwrite=args.overwrite,
                     replace=False)
    summary = run_pipeline(cfg, fresh=args.fresh, progress=not args.no_progress)
    if cfg.plot:
        plot_counts(summary, cfg.output_dir / "summary.png")
    if args.json:
        print(json.dumps(summary, indent=1, allow_nan=False))
    else:
        print(format_table(summary))
        print(f"done in {summary['seconds']}s -> {cfg.output_dir}")
    return 1 if summary["short_jobs"] else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moa synth", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run_verb(sys.modules[__name__], parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
