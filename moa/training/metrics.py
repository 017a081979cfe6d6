"""Training metrics: one JSON line per logged step (and per validation pass), sent to the experiment trackers too
(training/trackers.py), and a PNG of the curves."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from moa.atomic import atomic_file
from moa.errors import UsageError
from .trackers import Trackers


class MetricsLog:
    """Appends metrics rows to `path` (JSONL) and sends each to `trackers`. On resume, rows past the checkpoint's
    step, and a last line cut off by a kill mid-append, are dropped first."""

    def __init__(self, path: str | Path, trackers: Trackers | None = None, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self.truncate_after(resume_step)
        self.trackers = trackers

    def truncate_after(self, step: int):
        """Keep only rows with step <= `step` (rows a killed run logged after its last checkpoint go)."""
        rows = self.rows(drop_partial=True) if self.path.exists() else []
        with atomic_file(self.path) as f:
            f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows if r["step"] <= step))

    def rows(self, drop_partial: bool = False) -> list[dict]:
        """The rows; with `drop_partial`, a last line that is not complete JSON (a kill mid-append) is left out."""
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if drop_partial and number == len(lines):
                    print(f"warning: {self.path}: dropped the cut-off last line {number} ({err})", file=sys.stderr)
                    break
                raise UsageError(f"{self.path}: line {number} is not valid JSON ({err}): expected one JSON row "
                                 f"per line") from None
        return rows

    def log(self, row: dict):
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def close(self):
        if self.trackers is not None:
            self.trackers.close()


def plot_metrics(rows: list[dict], path: str | Path):
    """Loss, router loss, routing accuracy, per-culture LM loss and learning rate against the step."""
    from moa.plots import pyplot, save

    plt = pyplot()

    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps = [r["step"] for r in train]
    ax = axes[0, 0]
    ax.plot(steps, [r["lm_loss"] for r in train], label="train LM loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["lm_loss"] for r in evals], "o-", label="validation LM loss")
    ax.set_title("LM loss")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(steps, [r["router_loss"] for r in train], color="tab:red", label="router loss")
    acc = [(r["step"], r["routing_accuracy"]) for r in train if r.get("routing_accuracy") is not None]
    if acc:
        twin = ax.twinx()
        twin.plot(*zip(*acc), color="tab:green", label="routing accuracy")
        twin.set_ylim(0, 1.02)
        twin.set_ylabel("token routing accuracy")
    ax.set_title("Router")
    ax.legend(loc="upper left")
    ax = axes[1, 0]
    cultures = sorted({c for r in train for c in r.get("lm_loss_per_culture", {})})
    for culture in cultures:
        points = [(r["step"], r["lm_loss_per_culture"][culture]) for r in train if culture in r.get("lm_loss_per_culture", {})]
        ax.plot(*zip(*points), label=culture, linewidth=1)
    ax.set_title("LM loss per culture")
    if cultures:
        ax.legend(fontsize=7, ncol=2)
    ax = axes[1, 1]
    ax.plot(steps, [r["lr"] for r in train])
    ax.set_title("learning rate")
    for ax in axes.flat:
        ax.set_xlabel("step")
    save(fig, path)
