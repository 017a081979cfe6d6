"""The demo's views of `moa.eval.evaluate`'s results: accuracy and routing on a subset of the test rows
(the cued rows, the conflicting-norm questions, one culture's rows), and the prompts of the generation batch.

`results` is what `moa.eval.evaluate` returns for `rows`: `predictions` (per method, one label per label row
in row order), `routed` (the router's culture id per row) and `cultures`.
"""
from __future__ import annotations

from moa.data import LABELS
from moa.eval.scoring import accuracy_summary


def cued(row: dict) -> bool:
    """Whether the row's prompt carries a cultural cue (a country, city or name the router can read)."""
    return row.get("cue", True)


def conflicting_norms() -> set[str]:
    """The ids of the bundled norms whose answers conflict across cultures."""
    from moa.data.norms import conflicting_questions

    return {q.id for q in conflicting_questions()}


def accuracy_on(results: dict, rows: list[dict], keep) -> dict:
    """{method: accuracy_summary} over the label rows `keep(row)` selects."""
    label_rows = [r for r in rows if r["task"] in LABELS]
    picked = [i for i, r in enumerate(label_rows) if keep(r)]
    out = {}
    for method, predicted in results["predictions"].items():
        correct = [predicted[i] == label_rows[i].get("label", label_rows[i]["response"]) for i in picked]
        out[method] = accuracy_summary(correct, [label_rows[i] for i in picked], results["cultures"])
    return out


def routing_on(results: dict, rows: list[dict], keep) -> tuple[float | None, int]:
    """(share of the rows `keep(row)` selects that the router sends to their own culture, how many rows)."""
    cultures = results["cultures"]
    hits = [results["routed"][i] == cultures.index(r["culture"]) for i, r in enumerate(rows) if keep(r)]
    return (sum(hits) / len(hits) if hits else None), len(hits)


def held_out_conflicting(results: dict, rows: list[dict]) -> dict:
    """Accuracy of every method and routing accuracy on the test rows about conflicting norms, on all of them
    and on the rows whose prompt carries a cultural cue (the rows the router can read a culture from)."""
    conflicting = conflicting_norms()
    about = lambda r: r.get("norm") in conflicting  # noqa: E731
    about_cued = lambda r: about(r) and cued(r)  # noqa: E731
    accuracy, accuracy_cued = accuracy_on(results, rows, about), accuracy_on(results, rows, about_cued)
    routing, n_rows = routing_on(results, rows, about)
    routing_cued, n_rows_cued = routing_on(results, rows, about_cued)
    label_rows = [r for r in rows if r["task"] in LABELS]
    return {"norms": sorted({r["norm"] for r in rows if about(r)}), "accuracy": accuracy, "accuracy_cued": accuracy_cued,
            "routing_accuracy": routing, "routing_accuracy_cued": routing_cued, "n_rows": n_rows,
            "n_rows_cued": n_rows_cued, "n_label_rows": sum(map(about, label_rows)),
            "n_label_rows_cued": sum(map(about_cued, label_rows))}


def generation_rows(rows: list[dict], count: int) -> list[dict]:
    """`count` cued `open` test prompts from different cultures, preferably about one conflicting norm."""
    conflicting = conflicting_norms()
    by_norm = {}
    for r in rows:
        if r["task"] == "open" and cued(r):
            by_norm.setdefault(r.get("norm"), {}).setdefault(r["culture"], r)
    ranked = sorted(by_norm.items(), key=lambda kv: (kv[0] not in conflicting, -len(kv[1]), str(kv[0])))
    chosen, seen = [], set()
    for _, per_culture in ranked:
        for culture, row in per_culture.items():
            if culture not in seen and len(chosen) < count:
                chosen.append(row)
                seen.add(culture)
    return [{"id": r["id"], "prompt": r["prompt"], "culture": r["culture"], "reference": r["response"]} for r in chosen]


def two_stage_block(results: dict, ablated: dict, rows: list[dict]) -> dict:
    """Accuracy of MoA (oracle and routed) trained stage 1 then stage 2 (`results`) and stage 2 alone (`ablated`),
    on every label row and on the held-out conflicting-norm questions (all rows)."""
    out = {}
    for name, res in (("stage1_then_stage2", results), ("stage2_only", ablated)):
        conflicting = held_out_conflicting(res, rows)["accuracy"]
        out[name] = {method: {"all": res["accuracy"][method]["overall"], "per_task": res["accuracy"][method]["per_task"],
                              "conflicting": conflicting[method]["overall"]}
                     for method in ("moa_oracle", "moa_router")}
    return out
