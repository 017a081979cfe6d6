"""Synthesis run configuration (configs/synth/*.yaml): every key is checked, unknown keys are errors."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from moa.data.schema import CULTURES, TASKS
from moa.synth.queries import BROAD_QUERIES

DEFAULT_TASK_DIR = Path(__file__).resolve().parents[2] / "configs" / "tasks"

TEST_SPLITS = ("norms", "rows")
TOP_LEVEL = {
    "output_dir": "runs/synth",
    "seed": 0,
    "cultures": "all",
    "tasks": list(TASKS),
    "task_dir": None,                # relative to the config file; None = the repository's configs/tasks
    "samples_per_task": 240,         # stage-2 samples per culture and task
    "stage1_samples": 80,            # stage-1 (broad) samples per culture; 0 = none
    "samples_per_call": 10,
    "max_rounds": 5,                 # passes over the queries while a job is short of its target
    "test_split": "norms",           # what the test split holds out: whole norms, or rows (unseen questions)
    "test_fraction": 0.2,            # share of norms (or of stage-2 rows) held out as the test split
    "validation_fraction": 0.1,      # share of the remaining rows (by phrasing) for validation
    "balance": True,                 # cut every culture to the smallest culture's count per task
    "broad_queries": list(BROAD_QUERIES),
    "max_consecutive_errors": 5,     # failed LLM calls in a row before the run stops
    "cache": True,
    "plot": True,
    "retrieval": {"backend": "bm25"},
    "llm": {"backend": "offline"},
}
RETRIEVAL = {
    "bm25": {"backend": "bm25", "corpus": "bundled", "top_k": 5, "k1": 1.5, "b": 0.75},
    "searxng": {"backend": "searxng", "base_url": None, "top_k": 5, "timeout_s": 10.0, "max_retries": 3,
                "requests_per_minute": 30, "language": "en"},
}
LLM = {
    "offline": {"backend": "offline", "cue_free_share": 0.15},
    "openai": {"backend": "openai", "model": None, "base_url": "https://api.openai.com/v1",
               "api_key_env": "OPENAI_API_KEY", "temperature": 0.7, "max_tokens": 2048, "timeout_s": 60.0,
               "max_retries": 5, "requests_per_minute": None, "json_mode": True},
    "transformers": {"backend": "transformers", "model": None, "max_new_tokens": 1024, "temperature": 0.7,
                     "device": "auto", "dtype": "auto", "trust_remote_code": False},
}


@dataclass
class SynthConfig:
    output_dir: Path
    seed: int
    cultures: list
    tasks: list
    task_dir: Path
    samples_per_task: int
    stage1_samples: int
    samples_per_call: int
    max_rounds: int
    test_split: str
    test_fraction: float
    validation_fraction: float
    balance: bool
    broad_queries: list
    max_consecutive_errors: int
    cache: bool
    plot: bool
    retrieval: dict
    llm: dict

    def fingerprint(self) -> dict:
        """What the run's data depends on (not where it is written)."""
        out = {k: v for k, v in vars(self).items() if k not in ("output_dir", "plot")}
        out["task_dir"] = str(self.task_dir)
        return out


def _section(raw, choices: dict, where: str) -> dict:
    if not isinstance(raw, dict) or raw.get("backend") not in choices:
        raise ValueError(f"{where}.backend must be one of {sorted(choices)}, got {raw!r}")
    defaults = choices[raw["backend"]]
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where} ({raw['backend']}): expected {sorted(defaults)}")
    merged = {**defaults, **raw}
    missing = [k for k, v in merged.items() if v is None and k in ("model", "base_url")]
    if missing:
        raise ValueError(f"{where} ({raw['backend']}) needs {missing}")
    return merged


def _check(cfg: dict) -> None:
    positive = ("samples_per_task", "samples_per_call", "max_rounds", "max_consecutive_errors")
    for key in positive:
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if not isinstance(cfg["stage1_samples"], int) or cfg["stage1_samples"] < 0:
        raise ValueError(f"stage1_samples must be an integer >= 0, got {cfg['stage1_samples']!r}")
    if cfg["test_split"] not in TEST_SPLITS:
        raise ValueError(f"test_split must be one of {list(TEST_SPLITS)}, got {cfg['test_split']!r}")
    for key in ("test_fraction", "validation_fraction"):
        if not 0 <= cfg[key] < 1:
            raise ValueError(f"{key} must be within [0, 1), got {cfg[key]!r}")
    unknown = [c for c in cfg["cultures"] if c not in CULTURES]
    if unknown:
        raise ValueError(f"unknown culture(s) {unknown}: expected some of {CULTURES}")
    unknown = [t for t in cfg["tasks"] if t not in TASKS]
    if unknown or not cfg["tasks"]:
        raise ValueError(f"tasks must be a non-empty list from {TASKS}, got {cfg['tasks']!r}")
    if any("{culture}" not in q for q in cfg["broad_queries"]):
        raise ValueError(f"every broad query needs a {{culture}} slot, got {cfg['broad_queries']!r}")
    if cfg["llm"]["backend"] == "offline" and not (cfg["retrieval"]["backend"] == "bm25"
                                                   and cfg["retrieval"]["corpus"] == "bundled"):
        raise ValueError("the offline llm backend writes samples from the bundled norms, so it needs "
                         "retrieval: {backend: bm25, corpus: bundled}")


def load_config(path=None, **overrides) -> SynthConfig:
    """Read a config file (None = all defaults) and apply overrides (None values are ignored)."""
    raw, base = {}, Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"synth config {path} not found")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        base = path.parent
    raw.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}: expected {sorted(TOP_LEVEL)}")
    cfg = {**copy.deepcopy(TOP_LEVEL), **raw}
    if cfg["cultures"] == "all":
        cfg["cultures"] = list(CULTURES)
    cfg["retrieval"] = _section(cfg["retrieval"], RETRIEVAL, "retrieval")
    cfg["llm"] = _section(cfg["llm"], LLM, "llm")
    _check(cfg)
    if cfg["retrieval"]["backend"] == "bm25" and cfg["retrieval"]["corpus"] != "bundled":
        cfg["retrieval"]["corpus"] = str((base / cfg["retrieval"]["corpus"]).resolve())
    cfg["task_dir"] = DEFAULT_TASK_DIR if cfg["task_dir"] is None else (base / cfg["task_dir"]).resolve()
    cfg["output_dir"] = Path(cfg["output_dir"])
    return SynthConfig(**cfg)
