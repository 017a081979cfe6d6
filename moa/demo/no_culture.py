"""The demo's cue-free test split and what the router does with a prompt that names no culture.

The cue-free split is the cued test prompts with their cue taken out (`moa.synth.offline.without_cue`):
the same questions, nothing in the text saying whose norms apply. On it and on the cued split:
- abstention: how often the router's probability of its pick falls below the threshold (`moa serve`'s
  `--min-router-confidence`): on cue-free prompts it should abstain, on cued ones route, and rightly;
- calibration: the expected calibration error of the router's confidence on cued prompts, and the
  reliability diagram (OUT/reliability.png);
- the conflicting questions, cue-free: `moa_router` given each row's own culture as its hint, against
  `moa_oracle`, and with no hint (it falls back to the base model) against `base`.
"""
from __future__ import annotations

from moa.eval.calibration import expected_calibration_error, plot_reliability
from moa.synth.offline import without_cue

from .analytics import accuracy_on, conflicting_norms, cued

METHODS = ("base", "moa_oracle", "moa_router")
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the abstention rates reported, to choose the default from


def cue_free_rows(rows: list[dict]) -> list[dict]:
    """Every cued row with its prompt's cue taken out (`cue: false`, id suffixed `-cue-free`)."""
    return [{**r, "id": f"{r['id']}-cue-free", "prompt": without_cue(r["prompt"], r["culture"]), "cue": False}
            for r in rows if cued(r)]


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None  # noqa: E731
    return {"p50": at(0.5), "p95": at(0.95), "max": ordered[-1] if ordered else None}


def no_culture_block(run, results: dict) -> dict:
    """Abstention, calibration and conflicting-question accuracy on the cued and cue-free test prompts of `run`
    (a `moa.demo.phases.DemoRun` after its eval phase); `results` is moa.eval's on `run.rows`."""
    cultures, threshold = results["cultures"], results["min_router_confidence"]
    cued_index = [i for i, r in enumerate(run.rows) if cued(r)]
    confidence = [results["router_confidence"][i] for i in cued_index]
    right = [results["routed"][i] == cultures.index(run.rows[i]["culture"]) for i in cued_index]
    twins = cue_free_rows(run.rows)
    plain = run.evaluate(run.runs["moa"], twins, methods=METHODS)
    hinted_rows = [{**r, "culture_hint": r["culture"]} for r in twins]
    hinted = run.evaluate(run.runs["moa"], hinted_rows, methods=("moa_router",))
    conflicting = conflicting_norms()
    about = lambda r: r.get("norm") in conflicting  # noqa: E731
    accuracy = {method: summary["overall"] for method, summary in accuracy_on(plain, twins, about).items()}
    accuracy["moa_router_hint"] = accuracy_on(hinted, hinted_rows, about)["moa_router"]["overall"]
    plot_reliability(confidence, right, run.out / "reliability.png", "router confidence, cued test prompts")
    return {
        "min_router_confidence": threshold,
        "n_cued": len(cued_index), "n_cue_free": len(twins),
        "abstained_cue_free": _share([d != "router" for d in plain["decided_by"]]),
        "abstained_cued": _share([c < threshold for c in confidence]),
        "routing_accuracy_cued": _share(right),
        "routed_right_cued": _share([ok and c >= threshold for ok, c in zip(right, confidence)]),
        "ece_cued": expected_calibration_error(confidence, right),
        "confidence_cue_free": _quantiles(plain["router_confidence"]),
        "abstained_by_threshold": {f"{t:.1f}": {"cue_free": _share([c < t for c in plain["router_confidence"]]),
                                               "cued": _share([c < t for c in confidence])} for t in THRESHOLDS},
        "conflicting_cue_free": accuracy,
        "n_conflicting_cue_free": sum(map(about, [r for r in twins if r["task"] != "open"])),
    }
