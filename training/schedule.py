"""Learning rate over the stages: per stage a linear warmup to its peak, then cosine/linear/constant decay.

`StageSchedule` is handed to DeepSpeed as the LR scheduler, so it is stepped after every optimizer
step and saved in (and restored from) the DeepSpeed checkpoint.
"""
from __future__ import annotations

import math

from .config import TrainConfig


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of global optimizer step `step` (0-based)."""
    _, stage, local = config.stage_at(min(step, config.total_steps - 1))
    if local < stage.warmup_steps:
        return stage.lr * (local + 1) / (stage.warmup_steps + 1)
    decay_steps = stage.steps - stage.warmup_steps
    progress = (local - stage.warmup_steps) / max(decay_steps - 1, 1)
    floor = config.optim.min_lr_ratio
    if config.optim.schedule == "cosine":
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif config.optim.schedule == "linear":
        factor = 1 - (1 - floor) * progress
    else:
        factor = 1.0
    return stage.lr * factor


class StageSchedule:
    def __init__(self, optimizer, config: TrainConfig):
        self.optimizer, self.config, self.step_count = optimizer, config, 0
        self._apply()

    def _apply(self):
        lr = learning_rate(self.config, self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, *args, **kwargs):
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict):
        self.step_count = int(state["step_count"])
        self._apply()
