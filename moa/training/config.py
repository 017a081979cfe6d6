"""`TrainConfig`: one YAML file describing a training run. Validated before any compute.

Sections: `model` (moa.config.BaseModelConfig), `moa` (moa.MoAConfig), `stages` (one entry
per adaptation stage: data, steps, learning rate), `optim`, `batch`, and run settings. Read through
moa.config_loader: YAML 1.2 numbers, every field's type checked, unknown keys refused, dotted
`key=value` overrides. Relative data, model and DeepSpeed paths are resolved against the config
file's directory (output_dir against the working directory); a model path shaped like a Hub id
(`org/name`) that is no directory there stays a Hub id.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from moa import saved_run
from moa.config import BaseModelConfig, MoAConfig
from moa.config_loader import apply_overrides, from_mapping, load_yaml
from moa.errors import UsageError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # 'name' or 'org/name', as the Hugging Face Hub allows


def _positive(config, *names):
    for name in names:
        if getattr(config, name) <= 0:
            raise UsageError(f"{name} must be positive, got {getattr(config, name)!r}")


@dataclass
class StageConfig:
    name: str = field(metadata={"help": "Stage name used in logs (e.g. 'broad', 'task')."})
    train: list[str] = field(metadata={"help": "Training JSONL file(s) (docs/data.md schema)."})
    steps: int = field(metadata={"help": "Optimizer steps in this stage."})
    lr: float = field(metadata={"help": "Peak learning rate of this stage."})
    validation: list[str] = field(default_factory=list, metadata={"help": "Validation JSONL file(s), evaluated every eval_interval steps."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps at the start of the stage."})
    tasks: list[str] | None = field(default=None, metadata={"help": "Keep only rows of these tasks (default: all)."})

    def __post_init__(self):
        if not self.train:
            raise UsageError("train needs at least one JSONL file")
        _positive(self, "steps", "lr")
        if not 0 <= self.warmup_steps <= self.steps:
            raise UsageError(f"warmup_steps must be in 0..{self.steps}, got {self.warmup_steps!r}")


@dataclass
class OptimConfig:
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    schedule: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata={"help": "Decay after warmup within each stage: cosine, linear or constant."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final learning rate of a stage as a fraction of its peak."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."})

    def __post_init__(self):
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UsageError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if len(self.betas) != 2:
            raise UsageError(f"betas must be two numbers, got {self.betas!r}")
        for name in ("weight_decay", "eps", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass
class BatchConfig:
    micro_batch_size: int = field(default=4, metadata={"help": "Rows per forward pass on each process."})
    global_batch_size: int = field(default=8, metadata={"help": "Rows per optimizer step over all processes; "
                                                                 "gradient accumulation = global / (micro * world size)."})
    max_length: int = field(default=256, metadata={"help": "Tokens per row at most (prompt cut from the left)."})
    sampling: Literal["uniform", "proportional"] = field(default="uniform", metadata={"help": "Rows per culture in a batch: 'uniform' (each culture "
                                                               "equally likely) or 'proportional' (as in the data)."})

    def __post_init__(self):
        _positive(self, "micro_batch_size", "global_batch_size", "max_length")

    def accumulation(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise UsageError(f"batch.global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size} x world size {world_size}")
        return self.global_batch_size // per_step


@dataclass
class TrainConfig:
    model: BaseModelConfig = field(metadata={"help": "Base model: a local path, a Hub id or a tiny config, optional quantization."})
    moa: MoAConfig = field(metadata={"help": "Cultures, LoRA and router settings (moa.MoAConfig fields)."})
    stages: list[StageConfig] = field(metadata={"help": "Adaptation stages run in order (stage 1 broad, stage 2 task-aware)."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer and schedule."})
    batch: BatchConfig = field(default_factory=BatchConfig, metadata={"help": "Batch sizes, sequence length, culture sampling."})
    shared_lora: bool = field(default=False, metadata={"help": "Baseline: one LoRA of rank K*r trained on every culture's rows."})
    precision: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata={"help": "fp32, bf16 or fp16 (DeepSpeed mixed precision)."})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config; its 'auto' values are filled from this file."})
    output_dir: str = field(default="runs/train", metadata={"help": "Checkpoints, final/ export and metrics go here."})
    save_interval: int = field(default=50, metadata={"help": "Steps between checkpoints (the last step is always saved)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Complete checkpoints kept on disk."})
    eval_interval: int = field(default=0, metadata={"help": "Steps between validation passes (0 = only at the end)."})
    eval_rows: int = field(default=64, metadata={"help": "Validation rows evaluated per pass."})
    log_interval: int = field(default=1, metadata={"help": "Steps between metrics lines."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute decoder layers in backward."})
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(
        default_factory=list, metadata={"help": "Experiment trackers that also get every metrics row and the config: "
                                                "any of tensorboard (events in output_dir/tensorboard), wandb, mlflow, "
                                                "trackio; each an extra: pip install 'moa-cultures[wandb]'."})
    seed: int = field(default=0, metadata={"help": "Seed of data sampling and dropout."})
    init_from: str | None = field(default=None, metadata={"help": "A saved MoA run to grow: the adapters of its cultures "
                                                                  "(by name) are copied from it and, but for train_cultures, "
                                                                  "frozen; the router starts from it and grows to moa.cultures."})
    train_cultures: list[str] | None = field(default=None, metadata={"help": "With init_from: the cultures whose adapters "
                                                                              "train (default: those the source run lacks)."})
    train_base: bool = field(default=False, metadata={"help": "Train the base model itself (pre-training, full fine-tuning) on "
                                                           "text rows {\"culture\", \"text\"} with the next-token loss on every "
                                                           "token: no adapter, no router (moa.cultures label the rows); "
                                                           "final/ is a model directory that model.path can name."})

    def __post_init__(self):
        if not self.stages:
            raise UsageError("stages must list at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise UsageError(f"stage names must be unique, got {names}")
        _positive(self, "save_interval", "keep_checkpoints", "log_interval", "eval_rows")
        if self.eval_interval < 0:
            raise UsageError(f"eval_interval must be >= 0, got {self.eval_interval!r}")
        if self.train_cultures is not None:
            if self.init_from is None:
                raise UsageError("train_cultures needs init_from (the saved run whose other cultures stay frozen)")
            unknown = [c for c in self.train_cultures if c not in self.moa.cultures]
            if unknown or not self.train_cultures:
                raise UsageError(f"train_cultures {self.train_cultures} must name some of moa.cultures {self.moa.cultures}")
        if self.init_from is not None and self.shared_lora:
            raise UsageError("init_from grows a MoA run; shared_lora trains the one-LoRA baseline: use one or the other")
        if self.train_base and (self.shared_lora or self.init_from is not None or self.model.quantization is not None
                                or any(s.tasks is not None for s in self.stages)):
            raise UsageError(f"train_base trains the base's own full-precision weights on text rows: it takes no "
                             f"shared_lora, init_from, model.quantization or stage tasks, got shared_lora="
                             f"{self.shared_lora}, init_from={self.init_from!r}, quantization={self.model.quantization!r}, "
                             f"tasks={[s.tasks for s in self.stages]}")

    def frozen_cultures(self) -> list[str]:
        """The cultures whose adapters come from init_from and stay as they are there (checked against that run:
        the same base, and no weight decay, which would change frozen weights)."""
        if self.init_from is None:
            return []
        source, base = saved_run.read(self.init_from)
        if base.to_dict() != self.model.to_dict():
            raise UsageError(f"init_from {self.init_from} was trained on the base {base.to_dict()}, but model is "
                             f"{self.model.to_dict()}: a run grows on its own base")
        trained = self.train_cultures if self.train_cultures is not None else \
            [c for c in self.moa.cultures if c not in source.cultures]
        frozen = [c for c in self.moa.cultures if c in source.cultures and c not in trained]
        if frozen and self.optim.weight_decay:
            raise UsageError(f"optim.weight_decay is {self.optim.weight_decay}, but the adapters of {frozen} are frozen: "
                             f"weight decay would change them; set optim.weight_decay=0")
        if not trained:
            raise UsageError(f"init_from {self.init_from} already holds every culture of moa.cultures and train_cultures "
                             f"names none: list the new cultures in moa.cultures or the ones to retrain in train_cultures")
        return frozen

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, StageConfig, int]:
        """(stage index, stage, step within the stage) for global step `step` (0-based)."""
        start = 0
        for index, stage in enumerate(self.stages):
            if step < start + stage.steps:
                return index, stage, step - start
            start += stage.steps
        raise ValueError(f"step {step} is past the last stage (total {self.total_steps} steps)")

    def input_paths(self) -> list[str]:
        """Every local file or directory the run reads: the base model and tokenizer (unless Hub ids), data files and
        DeepSpeed config."""
        paths = [self.model.path, self.model.tokenizer if self.model.tokenizer != "byte" else None, self.deepspeed,
                 self.init_from]
        paths += [p for stage in self.stages for p in stage.train + stage.validation]
        return [p for p in paths if p and (Path(p).exists() or not HUB_ID.fullmatch(p))]

    def model_config(self) -> MoAConfig:
        """The MoAConfig actually trained: the shared baseline is one culture 'shared' of rank K*r."""
        if not self.shared_lora:
            return self.moa
        data = self.moa.to_dict()
        data.update(cultures=["shared"], r=self.moa.r * self.moa.num_cultures, alpha=self.moa.alpha * self.moa.num_cultures,
                    router_loss_weight=0.0, train_routing="gold", top_k=1)
        return MoAConfig(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", base_dir: str | Path = ".") -> "TrainConfig":
        """A TrainConfig from a parsed YAML mapping; relative paths in it are resolved against `base_dir`."""
        config = from_mapping(cls, data, source)
        config._resolve_paths(Path(base_dir))
        return config

    def _resolve_paths(self, base_dir: Path) -> None:
        def resolve(p):
            return p if Path(p).is_absolute() else str((base_dir / p).resolve())

        def resolve_model(p):  # a directory beside the config, else a Hub id as written
            return p if HUB_ID.fullmatch(p) and not Path(resolve(p)).is_dir() else resolve(p)

        if self.model.path:
            self.model.path = resolve_model(self.model.path)
        if self.model.tokenizer not in (None, "byte"):
            self.model.tokenizer = resolve_model(self.model.tokenizer)
        for stage in self.stages:
            stage.train = [resolve(p) for p in stage.train]
            stage.validation = [resolve(p) for p in stage.validation]
        if self.deepspeed:
            self.deepspeed = resolve(self.deepspeed)
        if self.init_from:
            self.init_from = resolve(self.init_from)

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] = ()) -> "TrainConfig":
        """The config file `path` with the dotted `key=value` overrides set (moa.config_loader.apply_overrides)."""
        path = Path(path)
        data = apply_overrides(cls, load_yaml(path), overrides)
        return cls.from_dict(data, source=str(path), base_dir=path.parent)
