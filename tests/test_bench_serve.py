"""`moa bench serve` at a tiny size: every system and load run, table printed, JSON and plot written.

Timings are only reported by the bench, never asserted here.
"""
import json
import statistics

import pytest

from moa.bench.serve import SYSTEMS
from moa.cli import main

TINY = ["--hidden-size", "32", "--intermediate-size", "64", "--layers", "1", "--heads", "4", "--vocab", "50",
        "--cultures", "3", "--rank", "4", "--max-batch-size", "4", "--prompt-lengths", "2,6", "--output-lengths", "2,8",
        "--rates", "50", "--clients", "3", "--requests", "8", "--runs", "2"]


@pytest.mark.slow
def test_bench_serve_tiny(tmp_path, capsys):
    path, figure = tmp_path / "serve.json", tmp_path / "serve.png"
    assert main(["bench", "serve", *TINY, "--json", str(path), "--plot", str(figure)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["bench"] == "serve" and report["args"]["cultures"] == 3
    assert [(r["load"], r["system"]) for r in report["results"]] == [(load, s) for load in ("50/s", "3 clients")
                                                                      for s in SYSTEMS]
    for header in ("system", "tokens/s", "TTFT p50 s", "ITL p99 s"):
        assert header in report["table"] and header in printed
    for row in report["results"]:
        assert row["runs"] == 2 == len(row["tokens_per_s_runs"])
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        assert row["tokens_per_s"] == pytest.approx(statistics.median(row["tokens_per_s_runs"]))
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and 0 < row["itl_p50_s"] <= row["itl_p99_s"]
    for load in ("50/s", "3 clients"):  # every system made the same requests' tokens
        assert len({tuple(r["output_tokens_runs"]) for r in report["results"] if r["load"] == load}) == 1
    by = {(r["system"], r["load"]): r["tokens_per_s"] for r in report["results"]}
    for other in ("base", "static", "single"):
        assert report["ratios"][f"moa/{other}"]["3 clients"] == pytest.approx(by[("moa", "3 clients")] / by[(other, "3 clients")])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == str(figure)
