"""`moa demo`: the quick version end to end through the `moa` entry point, with both experiments (the two-stage
ablation and adding a held-out culture), and config errors."""
import contextlib
import io
import json

import pytest
import torch

from moa import saved_run
from moa.cli import main
from moa.data.schema import LABELS
from moa.demo import DEFAULT_CONFIG
from moa.eval import METHODS

ADDED = "japan"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One quick demo with both experiments: (its output directory, what it printed)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress", "--test-split", "norms",
                     "--stage-ablation", "--add-culture", ADDED]) == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_demo_quick_end_to_end(quick_demo):
    out, printed = quick_demo
    results = json.loads((out / "results.json").read_text())
    assert results["test_split"] == "norms"
    test_norms = {json.loads(line).get("norm") for line in (out / "data" / "stage2_test.jsonl").read_text().splitlines()}
    train_norms = {json.loads(line).get("norm") for line in (out / "data" / "stage2_train.jsonl").read_text().splitlines()}
    assert test_norms and not test_norms & train_norms  # customs never trained on
    # the two-stage ablation: stage 2 alone for the steps of both stages, scored like the main run
    assert results["two_stage_steps"] == {"stage1_then_stage2": "5+20", "stage2_only": "25"}
    assert json.loads((out / "moa_stage2_only" / "train_config.json").read_text())["stages"][0]["steps"] == 25
    for name in ("stage1_then_stage2", "stage2_only"):
        assert set(results["two_stage"][name]) == {"moa_oracle", "moa_router"}
    assert results["two_stage"]["stage1_then_stage2"]["moa_oracle"]["all"] == results["accuracy"]["moa_oracle"]["overall"]
    timings = results["timings"]  # total: the demo's own phases; the ablation after them
    phases = sum(timings[k] for k in ("synth", "pretrain", "moa", "shared", "eval", "generate"))
    assert phases - 0.5 <= timings["total"] < phases + timings["stage2_only"]
    cultures = results["cultures"]
    rows = [json.loads(line) for line in (out / "data" / "stage2_test.jsonl").read_text().splitlines()]
    label_rows = [r for r in rows if r["task"] in LABELS]
    assert results["n_rows"] == len(rows) and results["n_label_rows"] == len(label_rows) > 0
    # routing: the confusion matrix counts every test row once under its culture; its trace is the rows routed right
    gold = [cultures.index(r["culture"]) for r in rows]
    confusion = results["confusion"]
    assert [sum(line) for line in confusion] == [gold.count(c) for c in range(len(cultures))]
    trace = sum(confusion[c][c] for c in range(len(cultures)))
    assert results["routing_accuracy"] == pytest.approx(trace / len(rows))
    assert results["routing_accuracy"] == pytest.approx(sum(g == r for g, r in zip(gold, results["routed"])) / len(rows))
    # every method's accuracy is its written predictions scored against the labels, overall and per culture,
    # and the per-culture accuracies average to the overall one weighted by their row counts
    labels = [r.get("label", r["response"]) for r in label_rows]
    assert set(results["accuracy"]) == set(results["predictions"]) == set(METHODS)
    for method in METHODS:
        entry = results["accuracy"][method]
        correct = [p == label for p, label in zip(results["predictions"][method], labels)]
        assert len(correct) == entry["n"] == len(label_rows)
        assert entry["overall"] == pytest.approx(sum(correct) / len(correct)), method
        for c, share in entry["per_culture"].items():
            hits = [ok for ok, r in zip(correct, label_rows) if r["culture"] == c]
            assert entry["n_per_culture"][c] == len(hits) and share == pytest.approx(sum(hits) / len(hits)), (method, c)
        weighted = sum(entry["per_culture"][c] * n for c, n in entry["n_per_culture"].items()) / entry["n"]
        assert weighted == pytest.approx(entry["overall"]), method
    held = results["held_out_conflicting"]
    assert set(held["accuracy"]) == set(METHODS)
    assert held["n_rows"] == sum(r.get("norm") in held["norms"] for r in rows)
    assert held["n_label_rows"] == sum(r.get("norm") in held["norms"] for r in label_rows) > 0
    # the cue-free split: every cued test row with its cue taken out, and the router's abstention on both splits
    block = results["no_culture"]
    cued = [i for i, r in enumerate(rows) if r.get("cue", True)]
    assert block["n_cued"] == len(cued) and block["n_cue_free"] == len(cued)
    confidence = [results["router_confidence"][i] for i in cued]
    assert block["abstained_cued"] == pytest.approx(sum(c < block["min_router_confidence"] for c in confidence) / len(cued))
    assert block["abstained_by_threshold"][f"{block['min_router_confidence']:.1f}"]["cued"] == pytest.approx(block["abstained_cued"])
    assert 0 <= block["ece_cued"] <= 1 and set(block["conflicting_cue_free"]) == {"base", "moa_oracle", "moa_router",
                                                                                    "moa_router_hint"}
    assert "When the prompt names no culture" in printed
    for name in ["data/stage2_test.jsonl", "base/model.safetensors", "base/tokenizer.json", "pretrain/texts.jsonl",
                 "pretrain/metrics.jsonl", "moa/final/moa_adapters.safetensors",
                 "shared/final/moa_adapters.safetensors", "results.md", "accuracy.png", "confusion.png", "pretrain.png",
                 "reliability.png", "moa/metrics.png", "shared/metrics.png", "generations.jsonl"]:
        assert (out / name).is_file(), name
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len({g["culture"] for g in generations}) == len(generations) > 1
    assert "moa_router" in printed and "Held-out conflicting-norm questions" in printed and str(out / "accuracy.png") in printed
    assert "| stage 2 alone | 25 |" in printed


@pytest.mark.slow
def test_demo_adds_a_held_out_culture(quick_demo):
    out, printed = quick_demo
    results = json.loads((out / "results.json").read_text())
    grow = json.loads((out / "grow.json").read_text())
    assert grow == results["grow"] and set(grow) == {"targets", "stages", "replay_rows", "cultures"}
    [entry] = grow["cultures"]
    assert entry["culture"] == ADDED
    assert set(entry) == {"culture", "old", "new", "routing_cued", "seconds", "replay", "old_adapters_unchanged", "runs", "met"}
    assert set(entry["met"]) == set(grow["targets"])
    cultures = results["cultures"]
    old = [c for c in cultures if c != ADDED]
    assert set(entry["old"]["change_points_per_culture"]) == set(old)
    assert entry["seconds"]["joint"] == results["timings"]["moa"] and entry["seconds"]["add"] > 0
    # the run without the culture saw none of its rows; the growth run all of them and a few cued rows of the others
    data = {name: [json.loads(line) for line in (out / "data" / f"stage2_{name}.jsonl").read_text().splitlines()]
            for name in ("train", "validation")}
    root = out / "grow" / ADDED
    for name, rows in data.items():
        without, growth = ([json.loads(line) for line in (root / kind / f"stage2_{name}.jsonl").read_text().splitlines()]
                           for kind in ("data_without", "data_grown"))
        assert [r["id"] for r in without] == [r["id"] for r in rows if r["culture"] != ADDED]
        assert [r["id"] for r in growth if r["culture"] == ADDED] == [r["id"] for r in rows if r["culture"] == ADDED]
        for culture in old:
            replayed = [r for r in growth if r["culture"] == culture]
            assert len(replayed) <= grow["replay_rows"] and all(r.get("cue", True) for r in replayed)
    # every old adapter of the grown run is bitwise the nine-culture run's
    source, grown = root / "without" / "final", root / "grown" / "final"
    assert entry["runs"] == {"without": str(source), "grown": str(grown)} and entry["old_adapters_unchanged"]
    a_config, b_config = saved_run.read_config(source), saved_run.read_config(grown)
    assert a_config.cultures == old and b_config.cultures == cultures
    a, b = saved_run.read_weights(source, a_config), saved_run.read_weights(grown, b_config)
    lora = [k for k in a if ".lora_" in k]
    assert lora and set(a) == set(b)
    for key in lora:
        for culture in old:
            assert torch.equal(a[key][a_config.cultures.index(culture)], b[key][b_config.cultures.index(culture)]), key
    table = (out / "grow.md").read_text()
    assert f"| {ADDED} |" in table and f"| {ADDED} |" in printed and "Adding a culture" in printed


def test_demo_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text(DEFAULT_CONFIG.read_text().replace("  seq_len: 128", "  seq_len: 128\n  seq_length: 64"))
    assert main(["demo", "--config", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert "seq_length" in capsys.readouterr().err
