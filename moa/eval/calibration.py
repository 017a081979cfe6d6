"""How far the router's confidence can be trusted: expected calibration error and the reliability diagram.

A router is calibrated when, among the prompts it routes with confidence p, a share p is routed right.
The confidences are put in `bins` equal-width bins over [0, 1]; the expected calibration error (ECE) is
the gap |accuracy - mean confidence| of each bin, weighted by the share of prompts in it.
"""
from __future__ import annotations

from pathlib import Path

from moa import plots


def reliability_bins(confidence: list[float], correct: list[bool], bins: int = 10) -> list[dict]:
    """One row per non-empty bin: its range, the prompts in it, their mean confidence and accuracy."""
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences but {len(correct)} outcomes: expected one per prompt")
    rows = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [i for i, c in enumerate(confidence) if low <= c < high or (b == bins - 1 and c == 1.0)]
        if inside:
            rows.append({"low": low, "high": high, "count": len(inside),
                         "confidence": sum(confidence[i] for i in inside) / len(inside),
                         "accuracy": sum(bool(correct[i]) for i in inside) / len(inside)})
    return rows


def expected_calibration_error(confidence: list[float], correct: list[bool], bins: int = 10) -> float:
    """Sum over bins of (prompts in the bin / all prompts) * |accuracy - mean confidence|; 0.0 for no prompts."""
    total = len(confidence)
    return sum(row["count"] / total * abs(row["accuracy"] - row["confidence"])
               for row in reliability_bins(confidence, correct, bins)) if total else 0.0


def plot_reliability(confidence: list[float], correct: list[bool], path: str | Path, title: str, bins: int = 10) -> Path:
    """The reliability diagram as a PNG: accuracy per confidence bin against the diagonal, with the prompts per bin."""
    rows = reliability_bins(confidence, correct, bins)
    plt = plots.pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    top.bar([(r["low"] + r["high"]) / 2 for r in rows], [r["accuracy"] for r in rows], width=1 / bins,
            edgecolor="black", alpha=0.7, label="accuracy")
    top.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o", color="black", label="mean confidence")
    top.set_ylabel("routing accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"{title} (ECE {expected_calibration_error(confidence, correct, bins):.3f})")
    top.legend(loc="upper left")
    bottom.bar([(r["low"] + r["high"]) / 2 for r in rows], [r["count"] for r in rows], width=1 / bins, edgecolor="black")
    bottom.set_xlabel("router confidence")
    bottom.set_ylabel("prompts")
    bottom.set_yscale("log")
    bottom.set_xlim(0, 1)
    return plots.save(fig, path)
