"""`moa bench train` at a tiny size: table and JSON structure, real optimizer steps, consistent losses.

Timings are only reported by the bench, never asserted here.
"""
import json
import math

import pytest

from moa.bench.common import paired_ratio
from moa.bench.train import PROVIDERS
from moa.cli import main


def tiny_args(batch=6):
    return ["--hidden-size", "32", "--intermediate-size", "64", "--layers", "1", "--heads", "4", "--vocab", "64",
            "--cultures", "3", "--rank", "4", "--batch", str(batch), "--seq-len", "8", "--warmup", "1", "--repeat", "2",
            "--lr", "1e-2", "--threads", "1", "--device", "cpu"]


@pytest.mark.slow
def test_bench_train_tiny(tmp_path, capsys):
    path = tmp_path / "train.json"
    assert main(["bench", "train", *tiny_args(), "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["bench"] == "train"
    assert [r["provider"] for r in report["results"]] == list(PROVIDERS)
    for header in ("provider", "ms/step (median)", "tokens/s", "vs (b)"):
        assert header in report["table"] and header in printed
    for row in report["results"]:
        assert row["label"] in printed
        assert row["optimizer_steps_per_run"] == 3  # warmup + repeat, each a real AdamW step
        assert row["param_change"] > 0, f"{row['provider']}: some run's trainable parameters never changed"
        assert row["tokens"] == 6 * 8 and row["repeat"] == 2
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["ms_median"] * 1e3)
        for key in ("first_loss", "last_loss", "first_lm_loss", "last_lm_loss", "ms_median", "tokens_per_s"):
            assert math.isfinite(row[key]), (row["provider"], key, row[key])
    rows = {r["provider"]: r for r in report["results"]}
    assert rows["moa_joint"]["runs"] == 1 and rows["separate_runs"]["runs"] == 3
    assert rows["moa_joint"]["trainable_params"] > rows["shared_lora"]["trainable_params"]
    # every adapter starts as the base (B = 0), and (c)'s slices hold equal token counts, so the first
    # LM loss is the base model's loss on the batch for every provider
    first = rows["shared_lora"]["first_lm_loss"]
    for row in report["results"]:
        assert row["first_lm_loss"] == pytest.approx(first, rel=1e-5), row["provider"]
    assert rows["moa_joint"]["first_loss"] > rows["moa_joint"]["first_lm_loss"]  # lm + lambda * router loss
    # the checks hold the paired step-time ratios of the rows, and pass exactly when the ratios meet their bounds
    joint_vs_shared = paired_ratio(rows["moa_joint"], rows["shared_lora"])
    separate_vs_joint = paired_ratio(rows["separate_runs"], rows["moa_joint"])
    assert report["checks"] == [
        {"check": "(a) / (b) step time <= 1.2", "value": pytest.approx(joint_vs_shared), "passed": joint_vs_shared <= 1.2},
        {"check": "(a) faster than (c) for the same tokens: (c) / (a) > 1", "value": pytest.approx(separate_vs_joint),
         "passed": separate_vs_joint > 1.0},
    ]
    assert rows["shared_lora"]["vs_shared"] == 1.0


def test_bench_train_rejects_uneven_batch(tmp_path, capsys):
    assert main(["bench", "train", *tiny_args(batch=7), "--json", str(tmp_path / "x.json")]) == 2
    assert "--batch 7 must be a positive multiple of --cultures 3" in capsys.readouterr().err
