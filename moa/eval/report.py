"""The evaluation results as markdown tables, JSON and PNG plots (accuracy, confusion, routing by position)."""
from __future__ import annotations

import json
from pathlib import Path

from moa.atomic import atomic_file
from moa.plots import pyplot, save


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def format_markdown(results: dict) -> str:
    """Accuracy per method (overall, its abstention where the method has one: the rate and the accuracy of the
    abstained rows, per culture, per task), routing accuracy, what decided moa_router's cultures and the
    routing confusion."""
    accuracy, cultures = results["accuracy"], results["cultures"]
    out = ["# Evaluation", ""]
    out.append(f"{results['n_rows']} rows: {results['n_label_rows']} of a label task scored for accuracy, "
               f"{results['n_open_skipped']} `open` row(s) skipped for accuracy (free text, no label set) "
               f"and used for routing only.")
    if accuracy:
        counts = next(iter(accuracy.values()))["n_per_culture"]
        shown = [c for c in cultures if c in counts]
        out += ["", "## Label accuracy", ""]
        out += _table(["method", f"overall (n={next(iter(accuracy.values()))['n']})", "abstained", "abstained accuracy"]
                      + [f"{c} (n={counts[c]})" for c in shown],
                      [[m, _cell(a["overall"]), _cell(a.get("abstention", {}).get("rate")),
                        _cell(a.get("abstention", {}).get("accuracy"))] + [_cell(a["per_culture"].get(c)) for c in shown]
                       for m, a in accuracy.items()])
        out += ["", f"`abstained`: the share of rows on which the router's probability of its pick was below "
                    f"{results['min_router_confidence']:g}, which ran the row's culture hint, else "
                    f"{results['fallback_culture'] or 'the base model'}; `abstained accuracy`: the accuracy of those rows."]
        tasks = list(next(iter(accuracy.values()))["per_task"])
        out += ["", "### Per task", ""]
        out += _table(["method"] + tasks, [[m] + [_cell(a["per_task"].get(t)) for t in tasks] for m, a in accuracy.items()])
    out += ["", "## Routing", ""]
    out.append(f"Sequence-level routing accuracy (router's culture at the last prompt token vs the row's culture): "
               f"{_cell(results['routing_accuracy'])} over {results['n_rows']} rows.")
    decided = {name: results["decided_by"].count(name) for name in ("router", "hint", "fallback")}
    out.append(f"Cultures `moa_router` ran (router's probability threshold {results['min_router_confidence']:g}): "
               + ", ".join(f"{n} decided by the {name}" for name, n in decided.items()) + ".")
    out += ["", "Confusion (rows: gold culture, columns: routed culture):", ""]
    out += _table(["gold \\ routed"] + cultures, [[c] + [str(v) for v in row] for c, row in zip(cultures, results["confusion"])])
    return "\n".join(out) + "\n"


def plot_confusion(results: dict, path) -> Path:
    """Heat map of sequence-level routing: gold culture rows x routed culture columns."""
    plt = pyplot()
    cultures, grid = results["cultures"], results["confusion"]
    size = 0.6 * len(cultures) + 2.5
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(grid, cmap="Blues")
    ax.set_xticks(range(len(cultures)), cultures, rotation=45, ha="right")
    ax.set_yticks(range(len(cultures)), cultures)
    ax.set_xlabel("routed culture")
    ax.set_ylabel("gold culture")
    top = max(max(row) for row in grid) or 1
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > top / 2 else "black")
    ax.set_title(f"routing confusion (accuracy {_cell(results['routing_accuracy'])})")
    fig.colorbar(image, ax=ax)
    return save(fig, path)


def plot_accuracy(results: dict, path) -> Path:
    """Overall accuracy per method (left) and per culture, grouped by method (right)."""
    plt = pyplot()
    accuracy = results["accuracy"]
    methods = list(accuracy)
    cultures = [c for c in results["cultures"] if any(c in a["per_culture"] for a in accuracy.values())]
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + max(4, 0.9 * len(cultures) + 1), 4.5),
                                      gridspec_kw={"width_ratios": [1, max(2, 0.5 * len(cultures))]})
    overall = [accuracy[m]["overall"] or 0.0 for m in methods]
    colors = [plt.cm.tab10(i % 10) for i in range(len(methods))]
    left.bar(range(len(methods)), overall, color=colors)
    left.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
    for i, value in enumerate(overall):
        left.text(i, value, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    left.set_ylim(0, 1.05)
    left.set_ylabel("accuracy")
    left.set_title("overall")
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        values = [accuracy[method]["per_culture"].get(c) or 0.0 for c in cultures]
        right.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(cultures))], values, width,
                  label=method, color=colors[i])
    right.set_xticks(range(len(cultures)), cultures, rotation=45, ha="right")
    right.set_ylim(0, 1.05)
    right.set_title("per culture")
    right.legend(fontsize=8, loc="upper right")
    return save(fig, path)


def plot_routing_by_position(results: dict, path) -> Path:
    """Token-level routing accuracy at each prompt position, with how many rows reach that position."""
    plt = pyplot()
    by_position = results["routing_by_position"]
    positions = range(len(by_position["count"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    counts = ax.twinx()
    counts.bar(positions, by_position["count"], width=1.0, color="lightgray", label="rows")
    counts.set_ylabel("rows reaching the position")
    ax.set_zorder(counts.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot(positions, by_position["accuracy"], color="tab:blue", label="token routing accuracy")
    ax.axhline(1 / len(results["cultures"]), color="tab:red", linestyle="--", linewidth=1, label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("prompt token position")
    ax.set_ylabel("routing accuracy")
    ax.set_title("token-level routing accuracy by prompt position")
    ax.legend(fontsize=8, loc="lower right")
    return save(fig, path)


def write_report(results: dict, output_dir) -> dict:
    """Write results.md, results.json, confusion.png, accuracy.png and routing_by_position.png; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": output_dir / "results.md", "json": output_dir / "results.json"}
    with atomic_file(paths["markdown"]) as f:
        f.write(format_markdown(results))
    with atomic_file(paths["json"]) as f:
        f.write(json.dumps(results, indent=1, allow_nan=False) + "\n")
    paths["confusion"] = plot_confusion(results, output_dir / "confusion.png")
    if results["accuracy"]:
        paths["accuracy"] = plot_accuracy(results, output_dir / "accuracy.png")
    paths["routing_by_position"] = plot_routing_by_position(results, output_dir / "routing_by_position.png")
    return paths
