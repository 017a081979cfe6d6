"""`moa demo --add-culture`: a trained run grows by one culture, compared with the cultures trained jointly.

For each held-out culture: MoA trained on the other cultures with the demo's own training (the same base,
stages and seed; the data without the held-out culture's rows), then the held-out culture added through the
training config's `init_from` (the old adapters copied and frozen, the router grown). The growth run's data
holds every row of the new culture and `grow.replay_rows` cued rows of each old culture per file, which train
the router only; its batches draw rows in proportion to the data, so the new culture fills most of each batch.
Scored on the test split against the demo's jointly trained MoA: the old cultures' routed accuracy before and
after, the added culture's oracle accuracy, the routing of every cued row, and the wall time.

OUT/grow/<culture>/{data_without,data_grown}/    the two runs' data files
OUT/grow/<culture>/{without,grown}/              the two runs (moa.training output directories)
OUT/grow.json, OUT/grow.md                       the comparison (see report.format_grow)
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from .analytics import accuracy_on, cued, routing_on
from .config import STAGE_DATA

# |change| of the old cultures' routed accuracy, |gap| of the added culture's oracle accuracy to the joint
# model's (both in points), routing accuracy on cued rows, wall time of adding one / training all jointly
TARGETS = {"old_change_points": 0.5, "new_gap_points": 2.0, "routing_cued": 0.97, "time_ratio": 0.2}


def write_data(data_dir: Path, out_dir: Path, select, seed: int) -> dict[str, int]:
    """The demo's stage files (train and validation) with the rows `select(rows, rng)` keeps; returns the rows
    per culture of stage 2's training file."""
    from moa.data import load_jsonl, write_jsonl

    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stage in STAGE_DATA:
        for split in ("train", "validation"):
            kept = select(load_jsonl(data_dir / f"{stage}_{split}.jsonl"), rng)
            write_jsonl(out_dir / f"{stage}_{split}.jsonl", kept)
            if (stage, split) == ("stage2", "train"):
                counts = {c: sum(r["culture"] == c for r in kept) for c in dict.fromkeys(r["culture"] for r in kept)}
    return counts


def without(culture: str):
    """A `select` for `write_data`: every row but `culture`'s."""
    return lambda rows, rng: [r for r in rows if r["culture"] != culture]


def with_replay(new: str, per_culture: int):
    """A `select` for `write_data`: every row of `new` and `per_culture` cued rows of each other culture, drawn
    at random; the file's order is kept."""
    def select(rows, rng):
        picked = set()
        for culture in sorted({r["culture"] for r in rows} - {new}):
            pool = [i for i, r in enumerate(rows) if r["culture"] == culture and cued(r)]
            picked.update(rng.sample(pool, min(per_culture, len(pool))))
        return [r for i, r in enumerate(rows) if r["culture"] == new or i in picked]
    return select


def old_adapters_unchanged(source: Path, grown: Path) -> bool:
    """Whether every adapter tensor of every culture of `source` is bitwise the same in `grown`."""
    from moa import saved_run

    a_config, b_config = saved_run.read_config(source), saved_run.read_config(grown)
    a, b = saved_run.read_weights(source, a_config), saved_run.read_weights(grown, b_config)
    return all(torch.equal(a[key][a_config.cultures.index(c)], b[key][b_config.cultures.index(c)])
               for key in a if ".lora_" in key for c in a_config.cultures)


def _points(after: float, before: float) -> float:
    return round(100 * (after - before), 2)


def train_without(run, new: str) -> Path:
    """MoA trained on every culture but `new` (OUT/grow/<new>/without/), on the demo's data without `new`'s rows."""
    root = Path("grow") / new
    write_data(run.data, run.out / root / "data_without", without(new), run.seed)
    return run.train_moa(str(root / "without"), run.out / root / "data_without", [c for c in run.cultures if c != new])


def add_back(run, new: str, without_dir: Path, name: str = "grown") -> dict:
    """`new` added to the saved run `without_dir` with the config's `grow` section (OUT/grow/<new>/<name>/, its data in
    data_<name>/); the comparison for `new` (see the module doc)."""
    grow, root = run.config.grow, Path("grow") / new
    counts = write_data(run.data, run.out / root / f"data_{name}", with_replay(new, grow.replay_rows), run.seed)
    start = time.perf_counter()
    grown_dir = run.train_moa(str(root / name), run.out / root / f"data_{name}", run.cultures, stages=grow.stages,
                              init_from=str(without_dir), batch={**(run.config.train.batch or {}), "sampling": "proportional"})
    return compare(run, new, without_dir, grown_dir, time.perf_counter() - start, counts)


def compare(run, new: str, without_dir: Path, grown_dir: Path, grown_s: float, counts: dict[str, int]) -> dict:
    """The comparison for `new` of the run without it, the run it was added to (in `grown_s` seconds, on data of
    `counts` rows per culture) and the demo's joint run, on the test split."""
    grow = run.config.grow
    is_old, is_new = (lambda r: r["culture"] != new), (lambda r: r["culture"] == new)
    old_rows = [r for r in run.rows if is_old(r)]
    before, after = run.evaluate(without_dir, old_rows), run.evaluate(grown_dir, run.rows)
    routed_before = accuracy_on(before, old_rows, is_old)["moa_router"]
    routed_after = accuracy_on(after, run.rows, is_old)["moa_router"]
    oracle_grown = accuracy_on(after, run.rows, is_new)["moa_oracle"]
    oracle_joint = accuracy_on(run.results, run.rows, is_new)["moa_oracle"]
    routing_all, n_cued = routing_on(after, run.rows, cued)
    joint_s = run.timings["moa"]
    return {
        "culture": new,
        "old": {"routed_before": routed_before["overall"], "routed_after": routed_after["overall"],
                "change_points": _points(routed_after["overall"], routed_before["overall"]),
                "change_points_per_culture": {c: _points(routed_after["per_culture"][c], routed_before["per_culture"][c])
                                              for c in routed_before["per_culture"]},
                "n_label_rows": routed_before["n"]},
        "new": {"oracle_grown": oracle_grown["overall"], "oracle_joint": oracle_joint["overall"],
                "gap_points": _points(oracle_grown["overall"], oracle_joint["overall"]),
                "routed_grown": accuracy_on(after, run.rows, is_new)["moa_router"]["overall"],
                "n_label_rows": oracle_grown["n"]},
        "routing_cued": {"all": routing_all, "n_rows": n_cued, "old_before": routing_on(before, old_rows, cued)[0],
                         "old_after": routing_on(after, run.rows, lambda r: is_old(r) and cued(r))[0],
                         "new": routing_on(after, run.rows, lambda r: is_new(r) and cued(r))[0],
                         "joint": run.results["routing_accuracy_cued"]},
        "seconds": {"add": round(grown_s, 1), "joint": joint_s, "ratio": round(grown_s / joint_s, 3)},
        "replay": {"rows_per_old_culture": grow.replay_rows, "new_rows": counts[new],
                   "new_share": round(counts[new] / sum(counts.values()), 3)},
        "old_adapters_unchanged": old_adapters_unchanged(without_dir, grown_dir),
        "runs": {"without": str(without_dir), "grown": str(grown_dir)},
    }


def met(entry: dict) -> dict[str, bool]:
    """Which of TARGETS one held-out culture's comparison meets."""
    return {"old_change_points": abs(entry["old"]["change_points"]) <= TARGETS["old_change_points"],
            "new_gap_points": abs(entry["new"]["gap_points"]) <= TARGETS["new_gap_points"],
            "routing_cued": entry["routing_cued"]["all"] >= TARGETS["routing_cued"],
            "time_ratio": entry["seconds"]["ratio"] <= TARGETS["time_ratio"]}


def add_cultures(run) -> dict:
    """The comparison for every culture of `run.add_cultures`, with the targets and the growth settings."""
    entries = []
    for new in run.add_cultures:
        entry = add_back(run, new, train_without(run, new))
        entries.append({**entry, "met": met(entry)})
    return {"targets": TARGETS, "stages": run.config.grow.stages, "replay_rows": run.config.grow.replay_rows,
            "cultures": entries}
