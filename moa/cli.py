"""The `moa` command. Each verb lives in its own module exposing HELP, add_arguments(parser) and run(args)."""
from __future__ import annotations

import argparse
import importlib
import sys

VERBS = {
    "bench": "moa.bench.cli",
    "demo": "moa.demo",
    "eval": "moa.eval.cli",
    "export": "moa.export",
    "generate": "moa.infer.cli",
    "synth": "moa.synth.cli",
    "train": "moa.training.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa", description="One model, many cultures: culture LoRAs behind a token-level router.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        verb_parser = sub.add_parser(verb, help=module.HELP, description=module.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
