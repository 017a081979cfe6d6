"""Checks on synthesized samples against the task spec: fields, labels, format, length, cues, duplicates.

`Validator.check(sample)` returns (row fields, None) for a valid sample or (None, reason) where the
reason is one of REJECT_REASONS; the pipeline counts the reasons and reports them.
"""
from __future__ import annotations

import re

from moa.data import norms
from moa.synth.prompting import SAMPLE_EXTRAS
from moa.synth.tasks import TaskSpec

REJECT_REASONS = ("not_an_object", "missing_field", "bad_label", "label_mismatch", "missing_options",
                  "prompt_too_long", "response_too_long", "other_culture_cue", "duplicate")
OPTION_LINE = re.compile(r"^\(?([A-D])\)", re.MULTILINE)


def canonical_label(task: str, text: str) -> str:
    """The label a free-form answer stands for: 'B) ...' -> 'B', 'Yes.' -> 'yes', 'not offensive' -> 'not_offensive'."""
    text = text.strip()
    if task == "mcq":
        match = re.match(r"^\(?([A-Da-d])\b", text)
        return match.group(1).upper() if match else text
    text = text.lower().strip(" .!\"'")
    if task == "offensive":
        text = re.sub(r"[\s-]+", "_", text)
    return text


def prompt_key(prompt: str) -> str:
    """The form under which two prompts count as duplicates (case and spacing ignored)."""
    return " ".join(prompt.lower().split())


class Validator:
    """Validates the samples of one (culture, task, stage) job; remembers prompts to drop duplicates."""

    def __init__(self, spec: TaskSpec, culture: str):
        self.spec, self.culture = spec, culture
        self.seen: set[str] = set()

    def check(self, sample) -> tuple[dict | None, str | None]:
        spec = self.spec
        if not isinstance(sample, dict):
            return None, "not_an_object"
        prompt, response = sample.get("prompt"), sample.get("response")
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(response, str) or not response.strip():
            return None, "missing_field"
        prompt, response = prompt.strip(), response.strip()
        row = {"prompt": prompt, "response": response}
        if spec.labels:
            label = canonical_label(spec.name, response)
            if label not in spec.labels:
                return None, "bad_label"
            given = sample.get("label")
            if given is not None and (not isinstance(given, str) or canonical_label(spec.name, given) != label):
                return None, "label_mismatch"
            row["response"] = row["label"] = label
            if spec.name == "mcq":
                letters = OPTION_LINE.findall(prompt)
                if len(letters) < 2 or label not in letters or letters != sorted(letters):
                    return None, "missing_options"
        if len(prompt.encode()) > spec.max_prompt_bytes:
            return None, "prompt_too_long"
        if len(row["response"].encode()) > spec.max_response_bytes:
            return None, "response_too_long"
        if norms.cultures_mentioned(prompt) - {self.culture}:
            return None, "other_culture_cue"
        key = prompt_key(prompt)
        if key in self.seen:
            return None, "duplicate"
        self.seen.add(key)
        for name in SAMPLE_EXTRAS:
            if name in sample:
                row[name] = sample[name]
        return row, None
