"""Task specifications (configs/tasks/<name>.yaml): instruction, answer format, labels, examples, queries."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moa.config_loader import from_mapping, load_yaml
from moa.data.schema import LABELS, TASKS
from moa.errors import UsageError


@dataclass(frozen=True)
class TaskSpec:
    name: str = field(metadata={"help": "The task, one of moa.data.TASKS."})
    description: str = field(metadata={"help": "What the task asks, in a sentence."})
    instruction: str = field(metadata={"help": "How to write a sample, given to the LLM."})
    answer_format: str = field(metadata={"help": "What the response must look like, given to the LLM."})
    labels: list[str] | None = field(metadata={"help": "The task's label set (moa.data.LABELS); null for free text."})
    max_prompt_bytes: int = field(metadata={"help": "Longest prompt accepted, in UTF-8 bytes."})
    max_response_bytes: int = field(metadata={"help": "Longest response accepted, in UTF-8 bytes."})
    examples: list = field(metadata={"help": "Example samples ({prompt, response}) shown to the LLM."})
    queries: list[str] = field(metadata={"help": "Retrieval query templates, each with a {culture} slot."})


def load_task(path) -> TaskSpec:
    """Read and check one task spec; errors name the file, the field and what was expected."""
    path = Path(path)
    spec = from_mapping(TaskSpec, load_yaml(path), str(path))
    if spec.name not in TASKS:
        raise UsageError(f"{path}: unknown task {spec.name!r}: expected one of {TASKS}")
    if spec.labels != LABELS.get(spec.name):
        raise UsageError(f"{path}: labels {spec.labels!r} must be {LABELS.get(spec.name)!r} (moa.data.LABELS)")
    if not spec.queries or any("{culture}" not in q for q in spec.queries):
        raise UsageError(f"{path}: every query template needs a {{culture}} slot, got {spec.queries!r}")
    for example in spec.examples:
        if set(example) != {"prompt", "response"}:
            raise UsageError(f"{path}: example {example!r} must have exactly prompt and response")
        if spec.labels and example["response"] not in spec.labels:
            raise UsageError(f"{path}: example response {example['response']!r} is not one of {spec.labels}")
        if len(example["prompt"].encode()) > spec.max_prompt_bytes:
            raise UsageError(f"{path}: example prompt is longer than max_prompt_bytes={spec.max_prompt_bytes}")
    return spec


def load_tasks(task_dir, names) -> dict:
    """name -> TaskSpec for each name, read from `task_dir/<name>.yaml`."""
    return {name: load_task(Path(task_dir) / f"{name}.yaml") for name in names}
