"""Run the whole pipeline on the embedded default (configs/demo/default.yaml), offline, on a CPU.

Phases, each with its progress bar:
  1. synth     culture-labelled task data from the offline backend          OUT/data/
  2. pretrain  a byte-level BPE tokenizer and a tiny Llama pre-trained on the
               bundled corpus only, so it is a language model that knows
               about the cultures (no synthesized row is read)             OUT/base/
  3. moa       culture adapters + router, stage 1 (broad) then stage 2 (tasks) OUT/moa/
  4. shared    the shared-LoRA baseline: same data, same steps               OUT/shared/
  5. eval      every method on the test split (unseen questions)           OUT/results.{json,md}, *.png
  6. generate  one mixed-culture batch, routed by the router                 OUT/generations.jsonl
Then it prints the results table, the accuracy on the held-out conflicting-norm questions, the
routing accuracy and where the plots are. After the demo's phases, `--stage-ablation` trains MoA on
stage 2 alone (OUT/moa_stage2_only/) and `--add-culture CULTURE ...` holds each culture named out,
trains MoA on the others and adds it back to that run (OUT/grow/, OUT/grow.{json,md}). `--quick` is a
small version of the same run (the tests use it). Everything is seeded by `--seed`. `KEY=VALUE`
arguments set config keys (`pretrain.steps=100`); the config in use is written to OUT/demo_config.json.

Modules: config (the config schema), corpus (pre-training texts, tokenizer), pretrain, train (the
moa.training runs), phases (the named steps), analytics (views of moa.eval's results), grow (the
growth experiment), report (tables, plots, files), pipeline (run_demo), cli (arguments).
"""
from .cli import add_arguments, run
from .config import DEFAULT_CONFIG, load_demo_config

__all__ = ["DEFAULT_CONFIG", "add_arguments", "load_demo_config", "run", "run_demo"]


def __getattr__(name: str):
    if name == "run_demo":  # loads on first use, so `moa demo --help` imports no more than its arguments
        from .pipeline import run_demo

        return run_demo
    raise AttributeError(f"module 'moa.demo' has no attribute {name!r}")
