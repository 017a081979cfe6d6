"""Learning rate over the stages: per stage a linear warmup to its peak, then cosine/linear/constant decay.

`StageSchedule` is handed to DeepSpeed as the LR scheduler, so it is stepped after every optimizer
step; its state (the step count) is saved in a checkpoint's trainer_state.json (see checkpoint.py).
"""
from __future__ import annotations

import math

from .config import TrainConfig


def warmup_decay(peak: float, step: int, steps: int, warmup_steps: int, min_lr_ratio: float,
                 schedule: str = "cosine") -> float:
    """The learning rate of step `step` (0-based) of `steps`: a linear warmup over `warmup_steps` to
    `peak`, then a cosine, linear or constant decay reaching `min_lr_ratio * peak` at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(steps - warmup_steps - 1, 1)
    if schedule == "cosine":
        factor = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "linear":
        factor = 1 - (1 - min_lr_ratio) * progress
    elif schedule == "constant":
        factor = 1.0
    else:
        raise ValueError(f"schedule must be cosine, linear or constant, got {schedule!r}")
    return peak * factor


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of global optimizer step `step` (0-based): `warmup_decay` within its stage."""
    _, stage, local = config.stage_at(min(step, config.total_steps - 1))
    return warmup_decay(stage.lr, local, stage.steps, stage.warmup_steps, config.optim.min_lr_ratio, config.optim.schedule)


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
