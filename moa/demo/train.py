"""The demo's moa.training runs: MoA (culture adapters + router), the shared-LoRA baseline, and the run
that grows a saved MoA run by more cultures (`init_from`), all from the demo config's `train` section."""
from __future__ import annotations

import copy
from pathlib import Path

from .config import STAGE_DATA, DemoConfig


def train_config(config: DemoConfig, base_dir: Path, data_dir: Path, out_dir: Path, cultures: list[str], seed: int,
                 shared: bool = False, stages: list[dict] | None = None, **run):
    """The moa.training config of a demo run on the data files of `data_dir` (stage1_*.jsonl, stage2_*.jsonl).

    shared: the shared-LoRA baseline. stages: instead of `train.stages`. run: further top-level keys of the
    training config (`init_from`, `batch`)."""
    from moa.training.config import TrainConfig

    train = config.train
    resolved = []
    for i, stage in enumerate(train.stages if stages is None else stages):
        stage = dict(stage)
        data = stage.pop("data", STAGE_DATA[min(i, 1)])
        stage["train"] = str(data_dir / f"{data}_train.jsonl")
        stage["validation"] = str(data_dir / f"{data}_validation.jsonl")
        resolved.append(stage)
    total = sum(int(s.get("steps", 0)) for s in resolved) or 1
    data = {"model": {"path": str(base_dir)}, "moa": {**train.moa, "cultures": cultures, "seed": seed},
            "stages": resolved, "optim": train.optim, "batch": train.batch, "shared_lora": shared,
            "output_dir": str(out_dir), "save_interval": total, "keep_checkpoints": 1, "eval_rows": train.eval_rows,
            "seed": seed, **run}
    return TrainConfig.from_dict(data, source="demo config train")


def train(training_config, progress: bool) -> Path:
    """One moa.training run of `training_config` (from `train_config`); returns its final/ directory."""
    from moa.training.trainer import Trainer

    return Trainer(training_config, output_dir=training_config.output_dir, show_progress=progress).run()


def stage2_only(config: DemoConfig) -> DemoConfig:
    """The demo config whose training is its last stage alone, run for the steps of all stages together
    (the two-stage ablation: the same total steps, no broad stage first)."""
    stages = config.train.stages
    ablated = copy.deepcopy(config)
    ablated.train.stages = [{**stages[-1], "steps": sum(int(s.get("steps", 0)) for s in stages)}]
    return ablated
