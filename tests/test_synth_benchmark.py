"""The synthesis benchmarks run end to end on small sizes (their timings are not checked)."""
import json
from pathlib import Path

from moa.synth import benchmark

DATA = Path(__file__).parent / "data"


def test_calls_benchmark_makes_exactly_the_calls_asked(tmp_path, capsys):
    assert benchmark.main(["calls", "--calls", "20", "--latency", "0", "--concurrency", "1", "4",
                           "--output", str(tmp_path / "calls.json")]) == 0
    rows = json.loads((tmp_path / "calls.json").read_text())
    assert [(r["concurrency"], r["calls"]) for r in rows] == [(1, 20), (4, 20)]  # counted by the server
    assert rows[0]["speedup"] == 1.0 and "calls_per_s" in capsys.readouterr().out


def test_scripts_benchmark_reports_every_language(tmp_path):
    assert benchmark.main(["scripts", "--corpus", str(DATA / "multilingual_corpus.jsonl"),
                           "--queries", str(DATA / "multilingual_queries.jsonl"),
                           "--output", str(tmp_path / "scripts.json")]) == 0
    rows = json.loads((tmp_path / "scripts.json").read_text())
    assert {r["language"] for r in rows} >= {"de", "ru", "el", "ar", "hi", "zh", "ja", "ko"}
