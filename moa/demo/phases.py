"""The demo's phases, each a named step over one `DemoRun` that holds what the phases share.

`run_demo` runs `DEMO_PHASES` in order, then the experiments asked for (`stage2_only`, `grow`), which reuse
what the demo's phases made (the data, the base, the ten-culture MoA run and its evaluation).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .analytics import cued, generation_rows, held_out_conflicting, routing_on, two_stage_block
from .config import DemoConfig
from .grow import add_cultures
from .no_culture import no_culture_block
from .pretrain import pretrain as pretrain_base
from .report import plot_pretrain
from .train import stage2_only, train, train_config

DEMO_PHASES = ["synth", "pretrain", "moa", "shared", "eval", "generate"]
EVAL_METHODS = ("moa_oracle", "moa_router")  # what the experiments score


@dataclass
class DemoRun:
    """One demo run: its settings and what each phase leaves for the next."""
    config: DemoConfig
    out: Path
    seed: int
    progress: bool
    add_cultures: list[str] = field(default_factory=list)
    cultures: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)  # the synthesis summary
    rows: list[dict] = field(default_factory=list)  # the test split
    runs: dict = field(default_factory=dict)  # name -> the final/ directory of each saved run, "base" -> the base
    results: dict = field(default_factory=dict)  # moa.eval.evaluate's results, and what the phases add
    generations: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.out / "base"

    @property
    def data(self) -> Path:
        return self.out / "data"

    def train_moa(self, name: str, data_dir: Path, cultures: list[str], **changes) -> Path:
        """A MoA run of the demo config on `data_dir`, written to OUT/<name>; `changes` as `train_config`'s."""
        return train(train_config(self.config, self.base, data_dir, self.out / name, cultures, self.seed, **changes),
                     self.progress)

    def evaluate(self, run_dir: Path, rows: list[dict], methods=EVAL_METHODS, **models) -> dict:
        """moa.eval.evaluate of the saved run `run_dir` on `rows` (the demo's eval settings)."""
        from moa.base_model import load_moa
        from moa.eval import evaluate

        model, tokenizer = load_moa(run_dir)
        return evaluate(model, tokenizer, rows, batch_size=self.config.eval.batch_size,
                        max_length=self.config.eval.max_length, progress=self.progress, methods=methods, **models)


@dataclass
class Phase:
    describe: Callable[[DemoRun], str]  # what the phase does, printed as it starts
    run: Callable[[DemoRun], None]


def synth(run: DemoRun) -> None:
    """Culture-labelled task data from the offline backend: OUT/data/ (stage1_*, stage2_*, summary.json/png)."""
    from moa.synth.config import load_config
    from moa.synth.pipeline import run as run_synth
    from moa.synth.report import plot_counts

    synth_config = load_config(None, **{**run.config.synth, "output_dir": str(run.data), "seed": run.seed, "plot": True})
    summary = run_synth(synth_config, fresh=True, progress=run.progress)
    if summary["short_jobs"]:
        raise RuntimeError(f"synthesis fell short of its targets: {summary['short_jobs']}")
    plot_counts(summary, run.data / "summary.png")
    run.summary, run.cultures = summary, list(summary["counts"])


def pretrain(run: DemoRun) -> None:
    """The tokenizer and the tiny base, pre-trained on the bundled corpus only: OUT/base/, OUT/pretrain.png."""
    history = pretrain_base(run.config, run.base, run.cultures, run.seed, run.progress)
    (run.base / "pretrain_metrics.json").write_text(json.dumps(history, allow_nan=False) + "\n")
    plot_pretrain(history, run.out / "pretrain.png")


def moa(run: DemoRun) -> None:
    run.runs.update(base=run.base, moa=run.train_moa("moa", run.data, run.cultures))


def shared(run: DemoRun) -> None:
    run.runs["shared"] = run.train_moa("shared", run.data, run.cultures, shared=True)


def evaluate(run: DemoRun) -> None:
    """Every method on the test split: moa.eval's results, the routing of the cued rows, the conflicting norms, and
    the cue-free split (moa.demo.no_culture: abstention, calibration, hints)."""
    from moa.base_model import load_moa
    from moa.data import load_jsonl
    from moa.eval import METHODS

    run.rows = load_jsonl(run.data / "stage2_test.jsonl", cultures=run.cultures)
    results = run.evaluate(run.runs["moa"], run.rows, methods=METHODS, shared_model=load_moa(run.runs["shared"])[0])
    results["routing_accuracy_cued"], results["n_rows_cued"] = routing_on(results, run.rows, cued)
    results["held_out_conflicting"] = held_out_conflicting(results, run.rows)
    results["no_culture"] = no_culture_block(run, results)
    run.results = results


def generate(run: DemoRun) -> None:
    """One mixed-culture batch, each prompt routed by the router: OUT/generations.jsonl."""
    from moa.base_model import load_moa
    from moa.data import write_jsonl
    from moa.infer.generate import generate_rows

    model, tokenizer = load_moa(run.runs["moa"])
    prompts = generation_rows(run.rows, run.config.generate.cultures)
    run.generations = generate_rows(model, tokenizer, prompts, routing="prompt",
                                    max_new_tokens=run.config.generate.max_new_tokens, progress=run.progress)
    for g, p in zip(run.generations, prompts):
        g["reference"] = p["reference"]
    write_jsonl(run.out / "generations.jsonl", run.generations)


def ablate_stage1(run: DemoRun) -> None:
    """MoA on stage 2 alone for the steps of both stages (OUT/moa_stage2_only/), scored like the demo's MoA."""
    ablated = stage2_only(run.config)
    run.runs["moa_stage2_only"] = run.train_moa("moa_stage2_only", run.data, run.cultures, stages=ablated.train.stages)
    run.results["two_stage"] = two_stage_block(run.results, run.evaluate(run.runs["moa_stage2_only"], run.rows), run.rows)
    run.results["two_stage_steps"] = {"stage1_then_stage2": _steps(run.config.train.stages),
                                      "stage2_only": _steps(ablated.train.stages)}


def grow(run: DemoRun) -> None:
    run.results["grow"] = add_cultures(run)


def _steps(stages: list[dict]) -> str:
    return "+".join(str(s["steps"]) for s in stages)


PHASES = {
    "synth": Phase(lambda r: f"offline backend -> {r.data}", synth),
    "pretrain": Phase(lambda r: f"tiny {r.config.model.family} on the bundled corpus -> {r.base}", pretrain),
    "moa": Phase(lambda r: f"culture adapters + router, {_steps(r.config.train.stages)} steps -> {r.out / 'moa'}", moa),
    "shared": Phase(lambda r: f"shared-LoRA baseline -> {r.out / 'shared'}", shared),
    "eval": Phase(lambda r: f"held-out test split ({r.config.synth.get('test_split', 'norms')} held out)", evaluate),
    "generate": Phase(lambda r: "one mixed-culture batch, each prompt routed by the router", generate),
    "stage2_only": Phase(lambda r: f"MoA on stage 2 alone, {_steps(stage2_only(r.config).train.stages)} steps -> "
                                   f"{r.out / 'moa_stage2_only'}", ablate_stage1),
    "grow": Phase(lambda r: f"hold out {', '.join(r.add_cultures)} one at a time: MoA on the other cultures, then the "
                            f"held-out one added ({_steps(r.config.grow.stages)} steps) -> {r.out / 'grow'}", grow),
}
