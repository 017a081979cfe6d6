"""The training-data schema: one JSON object per line, validated with file and line numbers.

A row is ``{"culture", "task", "prompt", "response"}`` plus optional fields (see OPTIONAL_FIELDS).
Loss is taken on the response only (see `moa.data.tokenize`). For label tasks the response is
exactly one label of the task's label set, so accuracy can be computed by scoring every label.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from moa.atomic import atomic_file
from moa.config import reserved_culture_problem
from moa.errors import UsageError

# The ten bundled national cultures (keys of bundled/cultures.yaml, in this order).
CULTURES = ["china", "india", "japan", "south_korea", "germany", "brazil", "nigeria", "egypt", "mexico",
            "united_states"]

# Task formats (one spec each in configs/tasks/<name>.yaml).
TASKS = ["mcq", "yesno", "offensive", "open"]

# Label sets of the label tasks; "open" answers are free text.
LABELS = {
    "mcq": ["A", "B", "C", "D"],
    "yesno": ["yes", "no"],
    "offensive": ["offensive", "not_offensive"],
}

REQUIRED_FIELDS = ("culture", "task", "prompt", "response")
SPLITS = ("train", "validation", "test")
# name -> (type check, what was expected)
OPTIONAL_FIELDS = {
    "id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "split": (lambda v: v in SPLITS, f"one of {list(SPLITS)}"),
    "source": (lambda v: isinstance(v, str), "a string (the backend that wrote the row)"),
    "label": (lambda v: isinstance(v, str), "a string from the task's label set"),
    "stage": (lambda v: v in (1, 2) and not isinstance(v, bool), "1 (broad cultural) or 2 (task-aware)"),
    "norm": (lambda v: isinstance(v, str) and v != "", "a non-empty norm id"),
    "cue": (lambda v: isinstance(v, bool), "true or false (whether the prompt carries a cultural cue)"),
    "provenance": (lambda v: isinstance(v, dict), "an object such as {\"query\": ..., \"doc_ids\": [...]}"),
    "culture_hint": (lambda v: isinstance(v, str) and v != "", "a culture name (run when the router abstains)"),
    "locale": (lambda v: isinstance(v, str) and v != "", "a language tag such as 'ja-JP' (a culture hint)"),
    "meta": (lambda v: isinstance(v, dict), "an object of free-form extras"),
}


class DataError(UsageError):
    """Malformed data. `problems` holds (path, line, message) for every bad line."""

    def __init__(self, problems: list[tuple[str, int, str]]):
        self.problems = problems
        shown = "\n".join(f"  {path}:{line}: {message}" for path, line, message in problems)
        files = sorted({path for path, _, _ in problems})
        super().__init__(f"{len(problems)} bad line(s) in {', '.join(files)}:\n{shown}")


def row_problems(row, known_cultures=CULTURES, known_tasks=TASKS) -> list[str]:
    """Everything wrong with one row, as messages naming the bad value and what was expected."""
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    problems = []
    for name in REQUIRED_FIELDS:
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"field {name!r} must be a non-empty string, got {value!r}")
    for name, value in row.items():
        if name in REQUIRED_FIELDS:
            continue
        if name not in OPTIONAL_FIELDS:
            expected = list(REQUIRED_FIELDS) + list(OPTIONAL_FIELDS)
            problems.append(f"unknown field {name!r}: expected fields {expected}")
            continue
        check, expected = OPTIONAL_FIELDS[name]
        if not check(value):
            problems.append(f"field {name!r} must be {expected}, got {value!r}")
    culture, task = row.get("culture"), row.get("task")
    if isinstance(culture, str) and (reserved := reserved_culture_problem(culture)):
        problems.append(reserved)
    elif isinstance(culture, str) and culture and culture not in known_cultures:
        problems.append(f"unknown culture {culture!r}: expected one of {list(known_cultures)}")
    if isinstance(task, str) and task and task not in known_tasks:
        problems.append(f"unknown task {task!r}: expected one of {list(known_tasks)}")
    if task in LABELS and isinstance(row.get("response"), str):
        response = row["response"]
        if response not in LABELS[task]:
            problems.append(f"response {response!r} of a {task!r} row must be one label of {LABELS[task]}")
        label = row.get("label")
        if isinstance(label, str) and label != response:
            problems.append(f"label {label!r} does not match response {response!r}")
    return problems


def json_lines(path, problems: list) -> "Iterator[tuple[int, object]]":
    """Yield (line number, parsed value) for every non-blank line of a JSONL file.

    Lines that are not valid JSON are recorded in `problems` as (file, line, message) and skipped;
    a missing file raises DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError([(str(path), 0, "no such file")])
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                problems.append((str(path), number, f"not valid JSON ({e.msg} at column {e.colno})"))


def load_jsonl(path, cultures=None, tasks=None) -> list[dict]:
    """Read and validate a JSONL file of rows; keep those of `cultures` and `tasks` (None = all).

    Every row must name a known culture (a bundled one or one listed in `cultures`) and a known
    task. Raises DataError listing every bad line with its file and line number.
    """
    known_cultures = list(CULTURES) + [c for c in (cultures or []) if c not in CULTURES]
    known_tasks = list(TASKS) + [t for t in (tasks or []) if t not in TASKS]
    rows, problems = [], []
    for number, row in json_lines(path, problems):
        bad = row_problems(row, known_cultures, known_tasks)
        problems.extend((str(path), number, message) for message in bad)
        if bad:
            continue
        if cultures is not None and row["culture"] not in cultures:
            continue
        if tasks is not None and row["task"] not in tasks:
            continue
        rows.append(row)
    if problems:
        raise DataError(problems)
    return rows


def write_jsonl(path, rows) -> None:
    """Write rows as JSONL, atomically."""
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
