"""Training batches: every stage's rows tokenized once, mixed-culture global batches drawn per step.

The rows of global step `s` are a pure function of (seed, stage, s), so a resumed run sees the
same data as an uninterrupted one with no sampler state to save, and any number of processes
splits the same global batch: micro-batch slot `m` of process `rank` holds rows
`[(m * world + rank) * micro, ... + micro)` of it.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from moa.data import CULTURES, IGNORE_INDEX, encode_example, load_jsonl
from moa.data.padding import pad, pad_batch
from moa.errors import UsageError
from moa.routing import NO_CULTURE


class StageData:
    """A stage's tokenized rows with their culture ids, sampled per culture uniformly or proportionally.
    A row of a culture the run does not train is refused."""

    def __init__(self, files, tokenizer, cultures: list[str], max_length: int, tasks=None, shared: bool = False):
        rows = []
        known = list(CULTURES) + [c for c in cultures if c not in CULTURES]
        for path in files:
            loaded = load_jsonl(path, cultures=known, tasks=tasks)
            others = sorted({row["culture"] for row in loaded} - set(cultures))
            if others:
                raise UsageError(f"{path}: {sum(row['culture'] in others for row in loaded)} row(s) of cultures {others}, "
                                 f"which the run does not train: expected only its cultures {cultures} (filter the file "
                                 f"or add them to moa.cultures)")
            rows.extend(loaded)
        if not rows:
            raise UsageError(f"no rows for cultures {cultures} (tasks {tasks or 'all'}) in {list(map(str, files))}")
        self._index(rows, [encode_example(tokenizer, row, max_length) for row in rows], cultures, shared)

    def _index(self, rows: list[dict], examples: list[dict], cultures: list[str], shared: bool = False) -> None:
        self.rows = rows
        self.examples = examples
        self.culture_names = [row["culture"] for row in rows]
        # the shared-LoRA baseline routes every row to its single slot 0
        self.culture_ids = np.array([0 if shared else cultures.index(row["culture"]) for row in rows])
        # the router learns a row's culture from a prompt that carries a cultural cue; a cue-free row (cue: false)
        # trains its culture's adapter, and its gates learn that the prompt names no culture (NO_CULTURE)
        self.router_targets = np.where([row.get("cue", True) for row in rows], self.culture_ids, NO_CULTURE)
        self.by_culture = {c: np.flatnonzero(np.array(self.culture_names) == c) for c in cultures}
        self.by_culture = {c: idx for c, idx in self.by_culture.items() if len(idx)}

    def __len__(self) -> int:
        return len(self.rows)

    def global_batch(self, seed: int, stage: int, step: int, size: int, sampling: str) -> np.ndarray:
        """Row indices of one global batch (a function of seed, stage and step only)."""
        rng = np.random.default_rng([seed, stage, step])
        if sampling == "proportional":
            return rng.integers(0, len(self.rows), size)
        cultures = list(self.by_culture)
        picks = rng.integers(0, len(cultures), size)
        return np.array([self.by_culture[cultures[c]][rng.integers(0, len(self.by_culture[cultures[c]]))] for c in picks])

    def collate(self, indices, pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded input_ids, attention_mask, labels (-100 on prompt and padding), culture_ids
        (the adapter of each row) and router_targets (the culture its gates learn, NO_CULTURE for a prompt
        that names none).

        Rows are grouped by culture (a stable sort), so each adapter's tokens are one contiguous
        slice and the multi-LoRA op needs no gather or scatter; the loss is a mean, so order is free.
        """
        indices = sorted(indices, key=lambda i: self.culture_ids[i])
        examples = [self.examples[i] for i in indices]
        ids, mask = pad_batch([e["input_ids"] for e in examples], pad_id)
        labels = pad([e["labels"] for e in examples], IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "culture_ids": torch.tensor(self.culture_ids[indices], dtype=torch.long),
                "router_targets": torch.tensor(self.router_targets[indices], dtype=torch.long)}


class TextData(StageData):
    """Language-modelling rows `{"culture": ..., "text": ...}` (`train_base`): the next-token loss on every token of
    the text, cut to `max_length` tokens with the EOS last; the culture only labels the statistics."""

    def __init__(self, files, tokenizer, cultures: list[str], max_length: int):
        if tokenizer.eos_token_id is None:
            raise UsageError(f"{type(tokenizer).__name__} has no eos token to end the texts with")
        rows = []
        for path in files:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                    if not (isinstance(row, dict) and set(row) == {"culture", "text"} and row["culture"] in cultures
                            and isinstance(row["text"], str) and row["text"]):
                        raise UsageError(f"{path}:{number}: expected {{\"culture\": one of {cultures}, \"text\": a "
                                         f"non-empty string}}, got {line.strip()[:200]!r}")
                    rows.append(row)
        if not rows:
            raise UsageError(f"no text rows in {list(map(str, files))}")
        examples = []
        for row in rows:
            ids = tokenizer(row["text"])["input_ids"][:max_length - 1] + [tokenizer.eos_token_id]
            examples.append({"input_ids": ids, "labels": ids})
        self._index(rows, examples, cultures)


def micro_batches(global_indices: np.ndarray, micro: int, rank: int, world: int) -> list[np.ndarray]:
    """This process's micro-batches of a global batch, in accumulation order."""
    slots = len(global_indices) // micro
    return [global_indices[s * micro:(s + 1) * micro] for s in range(rank, slots, world)]
