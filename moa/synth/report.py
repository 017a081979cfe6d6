"""The synthesis summary as a table (culture x task counts and rejects) and as a heat-map PNG."""
from __future__ import annotations

from pathlib import Path


def _columns(summary: dict) -> list:
    seen = []
    for per_culture in summary["counts"].values():
        seen += [c for c in per_culture if c not in seen]
    return sorted(seen, key=lambda c: (c != "stage1", c))


def format_table(summary: dict) -> str:
    columns = _columns(summary)
    header = ["culture"] + columns + ["rejected"]
    lines = []
    for culture, per in summary["counts"].items():
        rejected = sum(sum(r.values()) for r in summary["rejects"][culture].values())
        lines.append([culture] + [str(per.get(c, 0)) for c in columns] + [str(rejected)])
    totals = ["total"] + [str(sum(p.get(c, 0) for p in summary["counts"].values())) for c in columns]
    totals.append(str(sum(summary["rejects_total"].values())))
    lines.append(totals)
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    fmt = lambda row: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
    rule = "-" * len(fmt(header))
    out = [fmt(header), rule] + [fmt(r) for r in lines[:-1]] + [rule, fmt(lines[-1])]
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary["rejects_total"].items())) or "none"
    out.append(f"rejected by reason: {reasons}")
    out.append("files: " + ", ".join(f"{name} ({n})" for name, n in summary["files"].items()))
    if summary["short_jobs"]:
        out.append("short of target: " + ", ".join(f"{k} ({v})" for k, v in summary["short_jobs"].items()))
    return "\n".join(out)


def plot_counts(summary: dict, path) -> Path:
    """A culture x task heat map of the valid sample counts."""
    from moa.plots import pyplot, save

    plt = pyplot()
    columns = _columns(summary)
    cultures = list(summary["counts"])
    grid = [[summary["counts"][c].get(col, 0) for col in columns] for c in cultures]
    fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 2.5, 0.45 * len(cultures) + 1.5))
    image = ax.imshow(grid, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(cultures)), cultures)
    top = max(max(row) for row in grid) or 1
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                    color="white" if value > top / 2 else "black")
    ax.set_title("valid synthesized samples per culture and task")
    fig.colorbar(image, ax=ax)
    return save(fig, path)
