"""`run_demo`: the demo's phases in order, then the experiments asked for, each timed; the results written and printed."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from moa.errors import UsageError

from .config import DEFAULT_CONFIG, load_demo_config
from .phases import DEMO_PHASES, PHASES, DemoRun
from .report import print_summary, write_grow


def run_demo(output_dir: str | Path = "runs/demo", seed: int = 0, quick: bool = False, progress: bool = True,
             config_path: str | Path = DEFAULT_CONFIG, test_split: str | None = None, stage_ablation: bool = False,
             overrides: list[str] = (), add_cultures: list[str] = ()) -> dict:
    """Every phase in order; returns the results (also written to OUT/results.json).

    test_split: overrides the config's `synth.test_split` ('rows' or 'norms'). stage_ablation: also train
    MoA on stage 2 alone for the same total steps (OUT/moa_stage2_only/) and report both (`two_stage`).
    add_cultures: for each, train MoA without it and add it to that run (moa.demo.grow; `grow`, OUT/grow.*).
    """
    import torch

    from moa.eval import write_report
    from moa.synth.config import load_config

    config = load_demo_config(config_path, quick, overrides)
    if test_split is not None:
        config.synth["test_split"] = test_split
    cultures = load_config(None, **config.synth).cultures
    unknown = [c for c in add_cultures if c not in cultures]
    if unknown or len(set(add_cultures)) != len(add_cultures):
        raise UsageError(f"--add-culture {list(add_cultures)} must name distinct cultures of the demo, {cultures}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(config), indent=1, allow_nan=False) + "\n")
    run = DemoRun(config, out, seed, progress, add_cultures=list(add_cultures))
    names = DEMO_PHASES + ["stage2_only"] * stage_ablation + ["grow"] * bool(add_cultures)
    torch.manual_seed(seed)
    start = time.perf_counter()
    for number, name in enumerate(names, 1):
        print(f"[{number}/{len(names)} {name}] {PHASES[name].describe(run)}", flush=True)
        began = time.perf_counter()
        PHASES[name].run(run)
        run.timings[name] = round(time.perf_counter() - began, 1)
        print(f"[{name}] done in {run.timings[name]:.1f}s", flush=True)
        if name == DEMO_PHASES[-1]:  # the experiments run after the demo's phases, so that their times stand alone
            run.timings["total"] = round(time.perf_counter() - start, 1)
    results = run.results
    results.update(seed=seed, quick=quick, timings=run.timings, test_norms=run.summary["test_norms"],
                   test_split=config.synth.get("test_split", "norms"),
                   runs={name: str(path) for name, path in run.runs.items()})
    paths = write_report(results, out)
    if "grow" in results:
        paths.update({f"grow_{kind}": path for kind, path in write_grow(results["grow"], out).items()})
    print_summary(results, run.generations, paths, out)
    return results
