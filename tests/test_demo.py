"""`moa demo --quick` end to end, as a user runs it: every phase, the results file and the plots."""
import json
import subprocess
import sys

from moa.demo import load_demo_config
from train_helpers import ROOT, run_env

METHODS = ("base", "prompting", "shared_lora", "moa_oracle", "moa_router")


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "moa", "demo", "--quick", "--output-dir", str(out), "--no-progress"],
                            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["routing_accuracy"] <= 1.0
    cultures = results["cultures"]
    for method in METHODS:
        entry = results["accuracy"][method]
        assert 0.0 <= entry["overall"] <= 1.0
        assert set(entry["per_culture"]) <= set(cultures) and entry["per_culture"]
    for name in ("accuracy.png", "confusion.png", "results.md", "generations.jsonl", "moa/final/moa_adapters.safetensors",
                 "shared/final/moa_config.json", "moa/metrics.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "shared/final/moa_config.json").read_text())["cultures"] == ["shared"]
    assert "moa_router" in result.stdout and str(out / "accuracy.png") in result.stdout  # the table and the plot paths


def test_demo_config_refuses_unknown_keys(tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text((ROOT / "configs" / "demo" / "default.yaml").read_text() + "\nepochs: 3\n")
    try:
        load_demo_config(bad)
    except ValueError as err:
        assert "epochs" in str(err)
    else:
        raise AssertionError("an unknown key was accepted")
