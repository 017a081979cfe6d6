"""`moa bench e2e` at a tiny size: every provider and phase timed, table printed, JSON written.

Timings are only reported by the bench, never asserted here.
"""
import json
import statistics

import pytest

from moa.bench.common import paired_ratio
from moa.bench.e2e import PROVIDERS
from moa.cli import main

TINY = ["--hidden-size", "32", "--intermediate-size", "64", "--layers", "1", "--heads", "4", "--vocab", "50",
        "--cultures", "3", "--rank", "4", "--decode-batch", "6", "--decode-context", "5", "--prefill-batch", "3",
        "--prefill-length", "7", "--repeat", "4", "--device", "cpu"]


@pytest.mark.slow
def test_bench_e2e_tiny(tmp_path, capsys):
    path = tmp_path / "e2e.json"
    assert main(["bench", "e2e", *TINY, "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["bench"] == "e2e" and report["args"]["cultures"] == 3
    assert [(r["phase"], r["provider"]) for r in report["results"]] == \
        [(p, n) for p in ("decode", "prefill") for n in PROVIDERS] + [("route", "route_probs")]
    for header in ("provider", "tokens/s", "vs base (paired)"):
        assert header in report["table"] and header in printed
    rows = {(r["phase"], r["provider"]): r for r in report["results"]}
    for (phase, name), row in rows.items():
        assert row["tokens"] == (6 if phase == "decode" else 3 * 7)
        assert row["repeat"] == (4 if phase == "decode" else 5) == len(row["ms_rounds"])
        assert row["ms_median"] == pytest.approx(statistics.median(row["ms_rounds"]))
        assert row["ms_p20"] <= row["ms_median"] <= row["ms_p80"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["ms_median"] * 1e3)
        if phase != "route":  # route is paired with a second timing of the base prefill
            assert row["vs_base"] == pytest.approx(paired_ratio(rows[(phase, "base")], row))
    assert rows[("decode", "base")]["vs_base"] == 1.0


def test_paired_ratio_cancels_drift():
    fast, slow = {"ms_rounds": [10.0, 20.0, 40.0]}, {"ms_rounds": [12.0, 24.0, 48.0]}  # the machine slows down 4x
    assert paired_ratio(fast, slow) == pytest.approx(10 / 12)


def test_bench_e2e_rejects_unknown_provider(tmp_path, capsys):
    assert main(["bench", "e2e", *TINY, "--providers", "base,nope", "--json", str(tmp_path / "x.json")]) == 2
    assert "unknown providers ['nope']" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
