"""Synthesis run configuration (configs/synth/*.yaml): `SynthConfig` with its `retrieval` and `llm`
sections, one dataclass per backend (picked by the section's `backend`), read through
moa.config_loader (typed fields, unknown keys refused, dotted overrides)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from moa.config_loader import apply_overrides, from_mapping, load_yaml
from moa.data.schema import CULTURES, TASKS
from moa.errors import UsageError
from moa.resources import CONFIGS
from moa.synth.queries import BROAD_QUERIES, NATIVE_QUERIES

DEFAULT_TASK_DIR = CONFIGS / "tasks"
# llm keys that change how fast or how the calls are made, not the data: a run may resume with others
OPERATIONAL_KEYS = ("timeout_s", "max_retries", "concurrency", "requests_per_minute", "tokens_per_minute",
                    "input_price_per_1m", "output_price_per_1m", "batch", "batch_poll_s", "batch_size", "device")


@dataclass
class Bm25Config:
    backend: Literal["bm25"] = field(metadata={"help": "'bm25': BM25 over a local corpus."})
    corpus: str = field(default="bundled", metadata={"help": "'bundled' (the norms corpus) or a JSONL corpus file, "
                                                             "relative to the config file."})
    top_k: int = field(default=5, metadata={"help": "Passages retrieved per query."})
    k1: float = field(default=1.5, metadata={"help": "BM25 term-frequency saturation."})
    b: float = field(default=0.75, metadata={"help": "BM25 document-length normalisation."})


@dataclass
class SearxngConfig:
    backend: Literal["searxng"] = field(metadata={"help": "'searxng': the JSON search API of a SearXNG instance."})
    base_url: str = field(metadata={"help": "URL of the SearXNG instance."})
    top_k: int = field(default=5, metadata={"help": "Passages retrieved per query."})
    timeout_s: float = field(default=10.0, metadata={"help": "Timeout of one search request."})
    max_retries: int = field(default=3, metadata={"help": "Retries of a failed search request."})
    requests_per_minute: float | None = field(default=30, metadata={"help": "Rate limit (None: none)."})
    language: str = field(default="en", metadata={"help": "Search language, e.g. 'en' or 'ja-JP'; 'culture': each "
                                                          "culture's main language and region from the bundled norms."})


@dataclass
class OfflineLLMConfig:
    backend: Literal["offline"] = field(metadata={"help": "'offline': samples written from the bundled norms table, no model."})
    cue_free_share: float = field(default=0.15, metadata={"help": "Share of prompts that carry no cultural cue."})


@dataclass
class OpenAIConfig:
    backend: Literal["openai"] = field(metadata={"help": "'openai': an OpenAI-compatible chat completions API."})
    model: str = field(metadata={"help": "Model name sent with every request."})
    base_url: str = field(default="https://api.openai.com/v1", metadata={"help": "API base URL (vLLM, llama.cpp, Ollama, ...)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the API key."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    max_tokens: int = field(default=2048, metadata={"help": "Tokens per reply at most."})
    timeout_s: float = field(default=60.0, metadata={"help": "Timeout of one request."})
    max_retries: int = field(default=5, metadata={"help": "Retries of a failed request (timeouts, 429 and 5xx), "
                                                         "with backoff, jitter and Retry-After; with batch, also "
                                                         "the later batches a failed line is sent again in."})
    concurrency: int = field(default=16, metadata={"help": "Requests in flight at once."})
    requests_per_minute: float | None = field(default=None, metadata={"help": "Request budget per minute (None: none)."})
    tokens_per_minute: float | None = field(default=None, metadata={"help": "Token budget per minute (prompt + max_tokens, "
                                                                            "as OpenAI counts; None: none)."})
    json_mode: bool = field(default=True, metadata={"help": "Ask for a JSON object reply (response_format)."})
    input_price_per_1m: float | None = field(default=None, metadata={"help": "Price of a million prompt tokens, for the "
                                                                             "cost estimate (None: no estimate)."})
    output_price_per_1m: float | None = field(default=None, metadata={"help": "Price of a million completion tokens."})
    batch: bool = field(default=False, metadata={"help": "Send the calls through the Batch API (half the price, "
                                                        "replies within a day) instead of one request each."})
    batch_poll_s: float = field(default=30.0, metadata={"help": "Seconds between polls of a submitted batch."})


@dataclass
class TransformersLLMConfig:
    backend: Literal["transformers"] = field(metadata={"help": "'transformers': a local causal LM."})
    model: str = field(metadata={"help": "Hub name or local path of the model."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Tokens per reply at most."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (0: greedy)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated together."})
    device: str = field(default="auto", metadata={"help": "Torch device ('auto': cuda when available, else cpu)."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype passed to transformers."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to transformers; off unless you set it."})


@dataclass
class SynthConfig:
    output_dir: Path = field(default="runs/synth", metadata={"help": "Where the JSONL files, the summary and work/ "
                                                                     "(finished jobs, the LLM call cache) are written."})
    seed: int = field(default=0, metadata={"help": "Seed of the offline backend, the samplers and the splits."})
    cultures: Literal["all"] | list[str] = field(default="all", metadata={"help": "Cultures to synthesize for (bundled "
                                                                                 "names), or 'all'."})
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": "Stage-2 task formats."})
    task_dir: Path | None = field(default=None, metadata={"help": "Directory of the task specs <task>.yaml, relative to "
                                                                  "the config file; None: the bundled configs/tasks."})
    samples_per_task: int = field(default=240, metadata={"help": "Stage-2 samples per culture and task."})
    stage1_samples: int = field(default=80, metadata={"help": "Stage-1 (broad) samples per culture; 0 = none."})
    samples_per_call: int = field(default=10, metadata={"help": "Samples asked of the LLM per call."})
    max_rounds: int = field(default=5, metadata={"help": "Passes over the queries while a job is short of its target."})
    test_split: Literal["norms", "rows"] = field(default="norms", metadata={"help": "What the test split holds out: 'norms' (whole norms) "
                                                               "or 'rows' (unseen questions)."})
    test_fraction: float = field(default=0.2, metadata={"help": "Share of norms (or of stage-2 rows) held out as the test split."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of the remaining rows (by phrasing) for validation."})
    balance: bool = field(default=True, metadata={"help": "Cut every culture to the smallest culture's count per task."})
    broad_queries: list[str] = field(default_factory=lambda: list(BROAD_QUERIES),
                                metadata={"help": "Stage-1 query templates, each with a {culture} slot."})
    query_languages: Literal["english", "native", "both"] = field(
        default="english", metadata={"help": "Queries in English, in each culture's own languages (its language_codes "
                                             "in the bundled norms, templates from native_queries) or both."})
    native_queries: dict[str, list[str]] = field(default_factory=lambda: dict(NATIVE_QUERIES), metadata={
        "help": "Query templates per language code, each with a {culture} slot (the culture's native_name)."})
    max_consecutive_errors: int = field(default=5, metadata={"help": "Failed LLM calls in a row before the run stops."})
    cache: bool = field(default=True, metadata={"help": "Cache the LLM calls (work/cache.sqlite), so a rerun resumes."})
    plot: bool = field(default=True, metadata={"help": "Draw summary.png."})
    retrieval: Bm25Config | SearxngConfig = field(default_factory=lambda: Bm25Config("bm25"),
                                                  metadata={"help": "Retrieval backend: {backend: bm25, ...} or {backend: searxng, ...}."})
    llm: OfflineLLMConfig | OpenAIConfig | TransformersLLMConfig = field(
        default_factory=lambda: OfflineLLMConfig("offline"),
        metadata={"help": "LLM backend: {backend: offline | openai | transformers, ...}."})

    def __post_init__(self):
        if self.cultures == "all":
            self.cultures = list(CULTURES)
        self.output_dir = Path(self.output_dir)
        for section in (self.retrieval, self.llm):
            empty = [k for k in ("model", "base_url") if not getattr(section, k, True)]
            if empty:
                raise UsageError(f"{section.backend} backend needs {empty}, got empty values")
        for key in ("samples_per_task", "samples_per_call", "max_rounds", "max_consecutive_errors"):
            if getattr(self, key) < 1:
                raise UsageError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.stage1_samples < 0:
            raise UsageError(f"stage1_samples must be >= 0, got {self.stage1_samples!r}")
        for key in ("test_fraction", "validation_fraction"):
            if not 0 <= getattr(self, key) < 1:
                raise UsageError(f"{key} must be within [0, 1), got {getattr(self, key)!r}")
        unknown = [c for c in self.cultures if c not in CULTURES]
        if unknown:
            raise UsageError(f"unknown culture(s) {unknown}: expected some of {CULTURES}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise UsageError(f"tasks must be a non-empty list from {TASKS}, got {self.tasks!r}")
        if any("{culture}" not in q for templates in self.native_queries.values() for q in templates):
            raise UsageError(f"every native query needs a {{culture}} slot, got {self.native_queries!r}")
        if any("{culture}" not in q for q in self.broad_queries):
            raise UsageError(f"every broad query needs a {{culture}} slot, got {self.broad_queries!r}")
        if self.llm.backend == "offline" and not (self.retrieval.backend == "bm25" and self.retrieval.corpus == "bundled"):
            raise UsageError("the offline llm backend writes samples from the bundled norms, so it needs "
                             "retrieval: {backend: bm25, corpus: bundled}")

    def fingerprint(self) -> dict:
        """What the run's data depends on (not where it is written)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("output_dir", "plot")}
        out["llm"] = {k: v for k, v in out["llm"].items() if k not in OPERATIONAL_KEYS}
        out["task_dir"] = str(self.task_dir)
        return out


def load_config(path=None, overrides: list[str] = (), **values) -> SynthConfig:
    """Read a config file (None = all defaults), set the dotted `key=value` `overrides` (the command
    line's) and the top-level `values` (None values are ignored).

    A relative task_dir or bm25 corpus is resolved against the config file's directory (the
    working directory without a file)."""
    raw, base, source = {}, Path.cwd(), "synth config"
    if path is not None:
        path = Path(path)
        raw = load_yaml(path) or {}
        if not isinstance(raw, dict):
            raise UsageError(f"{path}: expected a mapping of config keys")
        base, source = path.parent, str(path)
    raw = apply_overrides(SynthConfig, raw, overrides)
    raw.update({k: v for k, v in values.items() if v is not None})
    cfg = from_mapping(SynthConfig, raw, source)
    if cfg.retrieval.backend == "bm25" and cfg.retrieval.corpus != "bundled":
        cfg.retrieval.corpus = str((base / cfg.retrieval.corpus).resolve())
    cfg.task_dir = DEFAULT_TASK_DIR if cfg.task_dir is None else (base / cfg.task_dir).resolve()
    return cfg
