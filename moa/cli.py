"""The `moa` command.

Each verb lives in its own module, which has `add_arguments(parser)` and `run(args)`, or is a group
of subcommands with a `COMMANDS` table of its own (`moa bench`). Only the module of the command being
run is imported, so `moa --help` and every verb's `--help` load no more than that verb's arguments.

Every verb reports the errors a user causes (moa.errors) as one line `error: ...` and exits 2;
Ctrl-C exits 130 with one line (saying how to resume, for a verb with a `RESUME_HINT`); any other
exception is a bug and prints its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from moa import __version__

VERBS = {  # verb: (module, one-line help)
    "bench": ("moa.bench.cli", "run a benchmark (table + JSON)"),
    "cultures": ("moa.cultures", "list a saved run's cultures, or write a run without some of them"),
    "demo": ("moa.demo", "run the whole pipeline offline on a CPU: synth, pretrain, train MoA and shared LoRA, eval, generate"),
    "eval": ("moa.eval.cli", "evaluate a saved MoA run: accuracy per method and culture, routing accuracy and confusion"),
    "export": ("moa.export", "export a run as PEFT adapters + router, or one culture merged into the base"),
    "generate": ("moa.infer.cli", "generate for a JSONL file of prompts, every row routed to its own culture"),
    "synth": ("moa.synth.cli", "synthesize culture-labelled, task-format training data"),
    "serve": ("moa.serve.cli", "serve a saved run over the OpenAI API: continuous batching of every culture, or a router front for vLLM"),
    "train": ("moa.training.cli", "train culture adapters and the router (DeepSpeed; two stages; resumable)"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except a default of None (the option's help says what happens then)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_commands(parser: argparse.ArgumentParser, dest: str, commands: dict, words: list[str]) -> None:
    """A subcommand of `parser` for each entry of `commands` ({name: (module, help)}), its name stored in
    `args.<dest>`. Only the command that `words` (the command line's non-option words) starts with has its
    module imported and its arguments added; the others are listed in the help at no cost."""
    sub = parser.add_subparsers(dest=dest, required=True, metavar=dest.upper())
    for name, (module_name, help_text) in commands.items():
        command = sub.add_parser(name, help=help_text, formatter_class=HelpFormatter)
        if words[:1] != [name]:
            continue
        module = importlib.import_module(module_name)
        command.description = module.__doc__
        if hasattr(module, "COMMANDS"):
            add_commands(command, name, module.COMMANDS, words[1:])
        else:
            module.add_arguments(command)
            command.set_defaults(_module=module_name)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the command line `argv`, with the arguments of the command it names."""
    parser = argparse.ArgumentParser(prog="moa",
                                     description="One model, many cultures: culture LoRAs behind a token-level router.")
    parser.add_argument("--version", action="version", version=f"moa {__version__} (distribution moa-cultures)")
    add_commands(parser, "verb", VERBS, [word for word in argv if not word.startswith("-")])
    return parser


def run_verb(module, args) -> int:
    """`module.run(args)` with the errors a user causes reported as one line (exit 2, or 130 for Ctrl-C)."""
    from moa.errors import USER_OS_ERRORS, UsageError

    try:
        return int(module.run(args) or 0)
    except (UsageError, *USER_OS_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(module, "RESUME_HINT", "")
        print(f"error: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return run_verb(importlib.import_module(args._module), args)
