"""Task specifications (configs/tasks/<name>.yaml): instruction, answer format, labels, examples, queries."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from moa.data.schema import LABELS, TASKS

FIELDS = ("name", "description", "instruction", "answer_format", "labels", "max_prompt_bytes",
          "max_response_bytes", "examples", "queries")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    instruction: str
    answer_format: str
    labels: list | None
    max_prompt_bytes: int
    max_response_bytes: int
    examples: list
    queries: list


def load_task(path) -> TaskSpec:
    """Read and check one task spec; errors name the file, the field and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task spec {path} not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of {list(FIELDS)}")
    unknown = sorted(set(raw) - set(FIELDS))
    missing = [f for f in FIELDS if f not in raw]
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {unknown}, missing keys {missing}; expected {list(FIELDS)}")
    spec = TaskSpec(**raw)
    if spec.name not in TASKS:
        raise ValueError(f"{path}: unknown task {spec.name!r}: expected one of {TASKS}")
    if spec.labels != LABELS.get(spec.name):
        raise ValueError(f"{path}: labels {spec.labels!r} must be {LABELS.get(spec.name)!r} (moa.data.LABELS)")
    if not spec.queries or any("{culture}" not in q for q in spec.queries):
        raise ValueError(f"{path}: every query template needs a {{culture}} slot, got {spec.queries!r}")
    for example in spec.examples:
        if set(example) != {"prompt", "response"}:
            raise ValueError(f"{path}: example {example!r} must have exactly prompt and response")
        if spec.labels and example["response"] not in spec.labels:
            raise ValueError(f"{path}: example response {example['response']!r} is not one of {spec.labels}")
        if len(example["prompt"].encode()) > spec.max_prompt_bytes:
            raise ValueError(f"{path}: example prompt is longer than max_prompt_bytes={spec.max_prompt_bytes}")
    return spec


def load_tasks(task_dir, names) -> dict:
    """name -> TaskSpec for each name, read from `task_dir/<name>.yaml`."""
    return {name: load_task(Path(task_dir) / f"{name}.yaml") for name in names}
