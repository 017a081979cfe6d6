"""The model's config dataclasses, and how every config dataclass of moa is read from a mapping.

`MoAConfig`: which cultures, which projections, LoRA and router settings. `BaseModelConfig`: which
base model a run adapts (a local transformers directory or a tiny config) and how to load it.
Both are validated on creation; files are read through moa.config_loader, whose `from_mapping`
checks every field's type.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moa.config_loader import from_mapping, load_yaml
from moa.errors import UsageError

ROUTING_MODES = ("oracle", "router", "topk")


TRAIN_ROUTING = ("gold", "router")
# Model ids that `moa serve` (and the `vllm serve` command of `moa export --format vllm`) give besides the cultures
RESERVED_CULTURES = ("auto", "base")


def reserved_culture_problem(name: str) -> str | None:
    """Why `name` cannot name a culture, or None when it can."""
    if name not in RESERVED_CULTURES:
        return None
    return (f"culture name {name!r} is reserved: 'auto' (the router's pick) and 'base' (the base model, no adapter) are "
            f"model ids of `moa serve` and 'base' is the base model's name in the vLLM export; rename the culture")


ALL_LINEAR = "all-linear"  # target_modules value: every linear layer of the decoder layers, as PEFT defines it


@dataclass
class MoAConfig:
    cultures: list[str] = field(metadata={"help": "Culture names; culture id i is cultures[i]. Unique, non-empty, "
                                                          "neither 'auto' nor 'base' (model ids of `moa serve`)."})
    r: int = field(default=16, metadata={"help": "LoRA rank of every culture adapter."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; scaling is alpha / r (alpha / sqrt(r) with rslora)."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layers to adapt, matched against the last component of module names (or a full dotted suffix); "
                          "'all-linear' (as in PEFT): every linear layer of the decoder layers, resolved to their names "
                          "when the model is built."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input during training."})
    rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha / sqrt(r)."})
    router_loss_weight: float = field(default=0.1, metadata={"help": "lambda in loss = lm_loss + lambda * router_loss."})
    train_routing: str = field(
        default="gold",
        metadata={"help": "Adapter the LM loss runs through in training: 'gold' (the row's culture label) or 'router' (the gate's top-1)."},
    )
    top_k: int | None = field(default=None, metadata={"help": "Adapters mixed per token in 'topk' routing (default: min(2, number of cultures))."})
    router_window: int = field(default=3, metadata={"help": "Tokens each gate feature reads: the token and the ones before it, so a "
                                                            "name split into subwords is read whole."})
    router_dim: int = field(default=32, metadata={"help": "Features per token of each gate (the window's projection)."})
    seed: int = field(default=0, metadata={"help": "Seed for adapter and router initialisation."})

    def __post_init__(self):
        if isinstance(self.cultures, str) or not isinstance(self.cultures, (list, tuple)):
            raise UsageError(f"cultures must be a list of names, got {self.cultures!r}")
        self.cultures = list(self.cultures)
        if not self.cultures:
            raise UsageError("cultures must not be empty")
        for name in self.cultures:
            if not isinstance(name, str) or not name.strip():
                raise UsageError(f"every culture must be a non-empty string, got {name!r}")
            if problem := reserved_culture_problem(name):
                raise UsageError(problem)
        dupes = sorted({c for c in self.cultures if self.cultures.count(c) > 1})
        if dupes:
            raise UsageError(f"cultures must be unique, repeated: {dupes}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise UsageError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise UsageError(f"alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise UsageError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise UsageError(f"target_modules {self.target_modules!r}: {ALL_LINEAR!r} stands alone (every linear layer), "
                             f"not beside module names")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.router_loss_weight < 0:
            raise UsageError(f"router_loss_weight must be >= 0, got {self.router_loss_weight!r}")
        if self.train_routing not in TRAIN_ROUTING:
            raise UsageError(f"train_routing must be one of {TRAIN_ROUTING}, got {self.train_routing!r}")
        for key in ("router_window", "router_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{key} must be a positive integer, got {value!r}")
        if self.top_k is None:
            self.top_k = min(2, len(self.cultures))
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= len(self.cultures):
            raise UsageError(f"top_k must be an integer in 1..{len(self.cultures)} (number of cultures), got {self.top_k!r}")

    @property
    def num_cultures(self) -> int:
        return len(self.cultures)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)

    def culture_id(self, culture: str | int, base: bool = True) -> int:
        """Index of a culture name; an int is range-checked and returned. -1 (the base model, no
        adapter) is accepted only with `base`: without, the culture must name an adapter slot."""
        if isinstance(culture, str):
            if culture not in self.cultures:
                raise UsageError(f"unknown culture {culture!r}: expected one of {self.cultures}")
            return self.cultures.index(culture)
        lowest = -1 if base else 0
        if not isinstance(culture, int) or isinstance(culture, bool) or not lowest <= culture < self.num_cultures:
            expected = "-1 (base model) or " if base else ""
            raise UsageError(f"culture id {culture!r} out of range: expected {expected}0..{self.num_cultures - 1} "
                             f"or a name of {self.cultures}")
        return culture

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "MoAConfig":
        return from_mapping(cls, data, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "MoAConfig":
        """Read a YAML or JSON file holding MoAConfig fields."""
        return cls.from_dict(load_yaml(path), source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")


QUANTIZATIONS = (None, "nf4", "fp4", "int8")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BaseModelConfig:
    path: str | None = field(default=None, metadata={"help": "Local transformers model directory (config.json + safetensors) or "
                                                              "Hugging Face Hub id (org/name), found through the Hub cache "
                                                              "(HF_HOME, HF_HUB_CACHE; HF_HUB_OFFLINE=1: the cache only)."})
    revision: str | None = field(default=None, metadata={"help": "With a Hub id: the branch, tag or commit to load (default: "
                                                                  "main); a trained run records the commit it resolved to."})
    tiny: dict | None = field(default=None, metadata={"help": "Instead of a path: keyword arguments of moa.tiny.tiny_config "
                                                              "(family, hidden_size, ...) for a randomly initialised tiny model."})
    tokenizer: str | None = field(default=None, metadata={"help": "'byte' (ByT5 byte tokenizer, no files) or a local tokenizer "
                                                                  "directory or Hub id; default: the model path (at its revision), "
                                                                  "or 'byte' for a tiny model."})
    quantization: str | None = field(default=None, metadata={"help": "None, 'nf4' or 'fp4' (bitsandbytes 4-bit, QLoRA) or 'int8'."})
    dtype: str = field(default="float32", metadata={"help": "Compute dtype: float32, bfloat16 or float16 (also the 4-bit quant storage)."})
    seed: int = field(default=0, metadata={"help": "Initialisation seed of a tiny model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to transformers; off unless you set it."})

    def __post_init__(self):
        if (self.path is None) == (self.tiny is None):
            raise UsageError(f"model: give exactly one of 'path' (a local model directory or Hub id) or 'tiny' (a tiny "
                             f"config), got path={self.path!r}, tiny={self.tiny!r}")
        if self.revision is not None and self.path is None:
            raise UsageError(f"model.revision {self.revision!r} applies to a Hub id in model.path, but the model is tiny")
        if self.tiny is not None and not isinstance(self.tiny, dict):
            raise UsageError(f"model.tiny must be a mapping of tiny_config arguments, got {self.tiny!r}")
        if self.quantization not in QUANTIZATIONS:
            raise UsageError(f"model.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self):
        """The torch dtype named by `dtype`."""
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model") -> "BaseModelConfig":
        return from_mapping(cls, data, source)
