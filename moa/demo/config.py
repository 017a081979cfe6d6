"""The demo config (configs/demo/default.yaml): its schema, the `quick:` overrides and loading."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from moa.config_loader import apply_overrides, from_mapping, load_yaml
from moa.errors import UsageError
from moa.resources import CONFIGS

DEFAULT_CONFIG = CONFIGS / "demo" / "default.yaml"
STAGE_DATA = ("stage1", "stage2")


def check_stages(stages, where: str) -> None:
    """Training stages of the demo: a list of moa.training stages, each with `data`: stage1 or stage2."""
    if not isinstance(stages, list) or not stages:
        raise UsageError(f"{where} must be a non-empty list of stages, got {stages!r}")
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or stage.get("data", STAGE_DATA[min(i, 1)]) not in STAGE_DATA:
            raise UsageError(f"{where}[{i}].data must be one of {STAGE_DATA}, got {stage!r}")


@dataclass
class TokenizerSection:
    vocab_size: int = field(metadata={"help": "Vocabulary of the byte-level BPE tokenizer fitted on the pre-training texts."})


@dataclass
class ModelSection:
    family: str = field(metadata={"help": "moa.tiny model family: llama, qwen2 or mistral (vocab_size comes from the tokenizer)."})
    hidden_size: int = field(metadata={"help": "Hidden size of the tiny model."})
    intermediate_size: int = field(metadata={"help": "MLP size of the tiny model."})
    num_hidden_layers: int = field(metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(metadata={"help": "Key/value heads (grouped-query attention)."})


@dataclass
class PretrainSection:
    steps: int = field(metadata={"help": "Optimizer steps of pre-training."})
    batch_size: int = field(metadata={"help": "Language-modelling texts per step."})
    seq_len: int = field(metadata={"help": "Tokens per text at most."})
    lr: float = field(metadata={"help": "Peak learning rate (linear warmup, then cosine decay)."})
    warmup_steps: int = field(metadata={"help": "Linear warmup steps."})
    min_lr_ratio: float = field(metadata={"help": "Final learning rate as a fraction of the peak."})
    weight_decay: float = field(metadata={"help": "AdamW weight decay."})
    retold_copies: int = field(metadata={"help": "Per culture: texts retelling its corpus facts under one cue."})
    retold_facts: int = field(metadata={"help": "Facts per retold text."})
    cue_list_copies: int = field(metadata={"help": "Per culture: shuffled lists of its cities and of its names."})


@dataclass
class TrainSection:
    moa: dict = field(metadata={"help": "moa.MoAConfig fields; cultures and seed are set by the demo."})
    stages: list = field(metadata={"help": "moa.training stages, each with `data`: stage1 or stage2 (default: stage1 "
                                           "for the first stage, stage2 after); data paths are set by the demo."})
    eval_rows: int = field(metadata={"help": "Validation rows evaluated per pass."})
    optim: dict | None = field(default=None, metadata={"help": "moa.training optim section."})
    batch: dict | None = field(default=None, metadata={"help": "moa.training batch section."})

    def __post_init__(self):
        check_stages(self.stages, "train.stages")


@dataclass
class EvalSection:
    batch_size: int = field(metadata={"help": "Sequences (rows x labels) per forward."})
    max_length: int = field(metadata={"help": "Tokens per sequence at most."})


@dataclass
class GenerateSection:
    cultures: int = field(metadata={"help": "Prompts in the mixed-culture batch, one culture each."})
    max_new_tokens: int = field(metadata={"help": "New tokens per prompt at most."})


@dataclass
class GrowSection:
    stages: list = field(metadata={"help": "`moa demo --add-culture`: the stages of the run that adds the held-out "
                                           "culture to the nine-culture run (as train.stages)."})
    replay_rows: int = field(metadata={"help": "Per old culture and data file: cued rows kept in the growth run's data "
                                               "(they train the router only; the rest of each batch is the new culture's)."})

    def __post_init__(self):
        check_stages(self.stages, "grow.stages")
        if self.replay_rows < 0:
            raise UsageError(f"grow.replay_rows must be >= 0, got {self.replay_rows!r}")


@dataclass
class DemoConfig:
    synth: dict = field(metadata={"help": "moa.synth.config keys; output_dir and seed are set by the demo."})
    tokenizer: TokenizerSection = field(metadata={"help": "Phase 2: the tokenizer."})
    model: ModelSection = field(metadata={"help": "Phase 2: the tiny model (moa.tiny.tiny_config arguments)."})
    pretrain: PretrainSection = field(metadata={"help": "Phase 2: pre-training on the bundled corpus."})
    train: TrainSection = field(metadata={"help": "Phases 3 and 4: moa.training config sections."})
    eval: EvalSection = field(metadata={"help": "Phase 5: evaluation."})
    generate: GenerateSection = field(metadata={"help": "Phase 6: the mixed-culture generation batch."})
    grow: GrowSection = field(metadata={"help": "`--add-culture`: the run that adds a held-out culture."})
    quick: dict | None = field(default=None, metadata={"help": "The overrides of `moa demo --quick`, merged in section "
                                                               "by section (a list replaces a list)."})

    def __post_init__(self):
        if not isinstance(self.synth, dict):
            raise UsageError(f"synth must be a mapping of moa.synth.config keys, got {self.synth!r}")
        self.quick = {} if self.quick is None else self.quick
        if not isinstance(self.quick, dict):
            raise UsageError(f"quick must be a mapping of sections to override, got {self.quick!r}")


def _merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_demo_config(path: str | Path = DEFAULT_CONFIG, quick: bool = False, overrides: list[str] = ()) -> DemoConfig:
    """The demo config, with its `quick:` section merged in when asked, then the dotted `key=value`
    `overrides` set; both versions (with and without `quick:`) are checked."""
    path = Path(path)
    raw = load_yaml(path)
    full = from_mapping(DemoConfig, apply_overrides(DemoConfig, copy.deepcopy(raw), overrides), str(path))
    small = from_mapping(DemoConfig, apply_overrides(DemoConfig, _merge(raw, full.quick), overrides), str(path))
    return small if quick else full
