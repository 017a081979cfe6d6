"""What the demo prints and writes besides moa.eval's report: the conflicting-norm, cue-free, two-stage and growth tables,
the pre-training curve, OUT/grow.{json,md} and the closing summary."""
from __future__ import annotations

import json
from pathlib import Path

from moa.atomic import atomic_file


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_conflicting(block: dict, cultures: list[str]) -> str:
    """The held-out conflicting-norm accuracy table (all rows and cued rows) in markdown."""
    from moa.eval import METHODS

    acc, cued = block["accuracy"], block["accuracy_cued"]
    shown = [c for c in cultures if any(c in a["per_culture"] for a in acc.values())]
    lines = [f"| method | all (n={block['n_label_rows']}) | cued (n={block['n_label_rows_cued']}) | " + " | ".join(shown) + " |",
             "|" + "---|" * (3 + len(shown))]
    for method in [m for m in METHODS if m in acc]:
        a = acc[method]
        lines.append(f"| {method} | {_pct(a['overall'])} | {_pct(cued[method]['overall'])} | "
                     + " | ".join(_pct(a["per_culture"].get(c)) for c in shown) + " |")
    return "\n".join(lines)


def format_two_stage(block: dict, steps: dict) -> str:
    """The two-stage ablation table in markdown."""
    tasks = list(next(iter(block["stage1_then_stage2"].values()))["per_task"])
    lines = ["| training | steps | all label rows: oracle | routed | conflicting, all rows: oracle | routed | "
             + " | ".join(f"{t} (oracle)" for t in tasks) + " |", "|" + "---|" * (6 + len(tasks))]
    for name, label in (("stage1_then_stage2", "stage 1 then stage 2"), ("stage2_only", "stage 2 alone")):
        o, r = block[name]["moa_oracle"], block[name]["moa_router"]
        lines.append(f"| {label} | {steps[name]} | {_pct(o['all'])} | {_pct(r['all'])} | {_pct(o['conflicting'])} | "
                     f"{_pct(r['conflicting'])} | " + " | ".join(_pct(o["per_task"].get(t)) for t in tasks) + " |")
    return "\n".join(lines)


def format_grow(block: dict) -> str:
    """The growth experiment's table in markdown: one line per held-out culture, then the targets."""
    targets = block["targets"]
    lines = ["| added culture | old cultures, routed: before / after (%) | change (points; widest culture) | "
             "added culture, oracle: grown / joint (%) | gap (points) | routing, cued rows of all cultures (%) | "
             "old / added cued rows (%) | wall time (s): add one / train all jointly | ratio | replay rows "
             "(added culture's share of a batch) |", "|" + "---|" * 10]
    for e in block["cultures"]:
        old, new, routing, seconds, replay = e["old"], e["new"], e["routing_cued"], e["seconds"], e["replay"]
        widest = max(old["change_points_per_culture"].items(), key=lambda kv: abs(kv[1]))
        mark = {k: "" if ok else " ✗" for k, ok in e["met"].items()}
        lines.append(f"| {e['culture']} | {_pct(old['routed_before'])} / {_pct(old['routed_after'])} | "
                     f"{old['change_points']:+.1f}{mark['old_change_points']} ({widest[0]} {widest[1]:+.1f}) | "
                     f"{_pct(new['oracle_grown'])} / {_pct(new['oracle_joint'])} | "
                     f"{new['gap_points']:+.1f}{mark['new_gap_points']} | {_pct(routing['all'])}{mark['routing_cued']} | "
                     f"{_pct(routing['old_after'])} / {_pct(routing['new'])} | {seconds['add']:.0f} / {seconds['joint']:.0f} | "
                     f"{seconds['ratio']:.2f}{mark['time_ratio']} | {replay['rows_per_old_culture']} "
                     f"({100 * replay['new_share']:.0f}%) |")
    lines += ["", f"Targets: old cultures' change within ±{targets['old_change_points']} points, the added culture within "
                  f"±{targets['new_gap_points']} points of the joint model, routing >= {100 * targets['routing_cued']:.0f}% of "
                  f"cued rows, adding one culture in at most {targets['time_ratio']:.0%} of the joint training's time "
                  f"(✗: missed). Growth stages: "
                  + ", ".join(f"{s.get('name', i)} {s['steps']} steps" for i, s in enumerate(block["stages"])) + "."]
    return "\n".join(lines)


def format_no_culture(block: dict) -> str:
    """The cue-free split's block in markdown: abstention on cue-free and cued prompts, calibration, and the
    conflicting questions without a cue."""
    acc = block["conflicting_cue_free"]
    t = block["min_router_confidence"]
    lines = ["| prompts | n | abstained (%) | routed right (%) |", "|---|---|---|---|",
             f"| cue-free (the cued test prompts, cue taken out) | {block['n_cue_free']} | "
             f"{_pct(block['abstained_cue_free'])} | - |",
             f"| cued | {block['n_cued']} | {_pct(block['abstained_cued'])} | {_pct(block['routing_accuracy_cued'])} |",
             "", f"At the threshold {t:g} (`--min-router-confidence`). Expected calibration error of the router's "
                 f"confidence on cued prompts: {block['ece_cued']:.3f} (reliability diagram: reliability.png). "
                 f"Abstained share by threshold, cue-free / cued: "
             + ", ".join(f"{k}: {_pct(v['cue_free'])} / {_pct(v['cued'])}" for k, v in block["abstained_by_threshold"].items())
             + ".", "",
             f"Conflicting-norm questions without a cue (n={block['n_conflicting_cue_free']}), label accuracy (%): "
             f"moa_router with the row's culture as its hint {_pct(acc['moa_router_hint'])}, moa_oracle "
             f"{_pct(acc['moa_oracle'])}; moa_router with no hint {_pct(acc['moa_router'])}, base {_pct(acc['base'])}."]
    return "\n".join(lines)


def write_grow(block: dict, out: Path) -> dict:
    """OUT/grow.json and OUT/grow.md; returns their paths."""
    paths = {"json": out / "grow.json", "markdown": out / "grow.md"}
    with atomic_file(paths["json"]) as f:
        f.write(json.dumps(block, indent=1, allow_nan=False) + "\n")
    with atomic_file(paths["markdown"]) as f:
        f.write("# Adding a culture to a trained run\n\n" + format_grow(block) + "\n")
    return paths


def plot_pretrain(history: list[dict], path: Path) -> None:
    """The pre-training LM loss against the step."""
    from moa.plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["lm_loss"] for h in history])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss")
    ax.set_title("pre-training on the bundled corpus")
    save(fig, path)


def print_summary(results: dict, generations: list[dict], paths: dict, out: Path) -> None:
    """The results table, the conflicting-norm questions, routing, the experiments, generations, files and times."""
    from moa.eval import format_markdown

    block = results["held_out_conflicting"]
    print()
    print(format_markdown(results))
    print(f"## Held-out conflicting-norm questions ({len(block['norms'])} norms: {', '.join(block['norms'])})")
    print()
    print("Label accuracy (%), all rows and rows whose prompt carries a cultural cue:")
    print()
    print(format_conflicting(block, results["cultures"]))
    print()
    print(f"Router sequence-level accuracy on these questions: {_pct(block['routing_accuracy_cued'])}% on the "
          f"{block['n_rows_cued']} cued rows, {_pct(block['routing_accuracy'])}% on all {block['n_rows']} rows "
          f"(cue-free prompts name no culture).")
    print(f"Router sequence-level accuracy on the whole test split: {_pct(results['routing_accuracy_cued'])}% on the "
          f"{results['n_rows_cued']} cued rows, {_pct(results['routing_accuracy'])}% on all {results['n_rows']} rows.")
    if "no_culture" in results:
        print()
        print("## When the prompt names no culture")
        print()
        print(format_no_culture(results["no_culture"]))
    if "two_stage" in results:
        print()
        print("## Two-stage adaptation: stage 1 (broad) then stage 2 (tasks) against stage 2 alone, same total steps")
        print()
        print(format_two_stage(results["two_stage"], results["two_stage_steps"]))
    if "grow" in results:
        print()
        print("## Adding a culture to a trained run: each held-out culture added to MoA trained without it, against "
              "the joint model")
        print()
        print(format_grow(results["grow"]))
    print()
    print("## Mixed-culture batch (one generate call, each prompt routed by the router)")
    print()
    for g in generations:
        print(f"- [{g['culture']} -> routed {g['router_choice']} ({g['router_confidence']:.2f})] {g['prompt']}")
        print(f"    model:     {g['text'].strip()}")
        print(f"    reference: {g['reference']}")
    print()
    plots = [paths.get("accuracy"), paths.get("confusion"), paths.get("routing_by_position"), out / "reliability.png",
             out / "moa" / "metrics.png",
             out / "shared" / "metrics.png", out / "pretrain.png", out / "data" / "summary.png"]
    print("Plots: " + ", ".join(str(p) for p in plots if p is not None))
    print(f"Results: {paths['json']}, {paths['markdown']}"
          + (f", {paths['grow_json']}, {paths['grow_markdown']}" if "grow_json" in paths else "")
          + f"; generations: {out / 'generations.jsonl'}")
    timings = results["timings"]
    after = [k for k in ("stage2_only", "grow") if k in timings]
    print("Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
          + (f" (total: the demo's phases; {' and '.join(after)} ran after them)" if after else ""))
