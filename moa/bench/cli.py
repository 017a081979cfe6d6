"""Benchmarks. Each prints a table and writes JSON; timings are never asserted by tests."""
from __future__ import annotations

import argparse
import importlib

HELP = "run a benchmark (table + JSON)"
BENCHES = {
    "e2e": "moa.bench.e2e",
    "kernels": "moa.bench.kernels",
    "train": "moa.bench.train",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module_name in BENCHES.items():
        module = importlib.import_module(module_name)
        bench_parser = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(bench_parser)
        bench_parser.set_defaults(_bench_run=module.run)


def run(args) -> int:
    return args._bench_run(args)
