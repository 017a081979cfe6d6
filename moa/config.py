"""`MoAConfig`: which cultures, which projections, LoRA and router settings. Validated on creation."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

ROUTING_MODES = ("oracle", "router", "topk")


def from_mapping(cls, data, source: str):
    """`cls(**data)` for a config dataclass, refusing a non-mapping and unknown keys, naming `source`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping, got {type(data).__name__} {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as err:
        raise ValueError(f"{source}: {err}") from None
TRAIN_ROUTING = ("gold", "router")


@dataclass
class MoAConfig:
    cultures: list[str] = field(metadata={"help": "Culture names; culture id i is cultures[i]. Unique, non-empty."})
    r: int = field(default=16, metadata={"help": "LoRA rank of every culture adapter."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; scaling is alpha / r (alpha / sqrt(r) with rslora)."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layers to adapt, matched against the last component of module names (or a full dotted suffix)."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input during training."})
    rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha / sqrt(r)."})
    router_loss_weight: float = field(default=0.1, metadata={"help": "lambda in loss = lm_loss + lambda * router_loss."})
    train_routing: str = field(
        default="gold",
        metadata={"help": "Adapter the LM loss runs through in training: 'gold' (the row's culture label) or 'router' (the gate's top-1)."},
    )
    top_k: int | None = field(default=None, metadata={"help": "Adapters mixed per token in 'topk' routing (default: min(2, number of cultures))."})
    seed: int = field(default=0, metadata={"help": "Seed for adapter and router initialisation."})

    def __post_init__(self):
        if isinstance(self.cultures, str) or not isinstance(self.cultures, (list, tuple)):
            raise ValueError(f"cultures must be a list of names, got {self.cultures!r}")
        self.cultures = list(self.cultures)
        if not self.cultures:
            raise ValueError("cultures must not be empty")
        for name in self.cultures:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"every culture must be a non-empty string, got {name!r}")
        dupes = sorted({c for c in self.cultures if self.cultures.count(c) > 1})
        if dupes:
            raise ValueError(f"cultures must be unique, repeated: {dupes}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.router_loss_weight < 0:
            raise ValueError(f"router_loss_weight must be >= 0, got {self.router_loss_weight!r}")
        if self.train_routing not in TRAIN_ROUTING:
            raise ValueError(f"train_routing must be one of {TRAIN_ROUTING}, got {self.train_routing!r}")
        if self.top_k is None:
            self.top_k = min(2, len(self.cultures))
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= len(self.cultures):
            raise ValueError(f"top_k must be an integer in 1..{len(self.cultures)} (number of cultures), got {self.top_k!r}")

    @property
    def num_cultures(self) -> int:
        return len(self.cultures)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)

    def culture_id(self, culture: str | int) -> int:
        """Index of a culture name (ints are range-checked and returned)."""
        if isinstance(culture, int):
            if not -1 <= culture < self.num_cultures:
                raise ValueError(f"culture id {culture} out of range: expected -1 or 0..{self.num_cultures - 1}")
            return culture
        if culture not in self.cultures:
            raise ValueError(f"unknown culture {culture!r}: expected one of {self.cultures}")
        return self.cultures.index(culture)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "MoAConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of MoAConfig fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown MoAConfig key(s) {unknown}; known keys: {sorted(known)}")
        if "cultures" not in data:
            raise ValueError(f"{source}: missing required key 'cultures'")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "MoAConfig":
        """Read a YAML or JSON file holding MoAConfig fields."""
        path = Path(path)
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
