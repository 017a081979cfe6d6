"""`moa demo`: the quick version end to end through the `moa` entry point, and config errors."""
import json

from moa.cli import main
from moa.demo import DEFAULT_CONFIG
from moa.eval import METHODS


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["routing_accuracy"] <= 1.0
    cultures = results["cultures"]
    for method in METHODS:
        entry = results["accuracy"][method]
        assert 0.0 <= entry["overall"] <= 1.0
        assert entry["per_culture"] and set(entry["per_culture"]) <= set(cultures)
    held = results["held_out_conflicting"]
    assert set(held["accuracy"]) == set(METHODS) and held["n_label_rows"] > 0
    for name in ["data/stage2_test.jsonl", "base/model.safetensors", "base/tokenizer.json", "moa/final/moa_adapters.safetensors",
                 "shared/final/moa_adapters.safetensors", "results.md", "accuracy.png", "confusion.png", "pretrain.png",
                 "moa/metrics.png", "shared/metrics.png", "generations.jsonl"]:
        assert (out / name).is_file(), name
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len({g["culture"] for g in generations}) == len(generations) > 1
    printed = capsys.readouterr().out
    assert "moa_router" in printed and "Held-out conflicting-norm questions" in printed and str(out / "accuracy.png") in printed


def test_demo_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text(DEFAULT_CONFIG.read_text().replace("  seq_len: 128", "  seq_len: 128\n  seq_length: 64"))
    assert main(["demo", "--config", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert "seq_length" in capsys.readouterr().err
