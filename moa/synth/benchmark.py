"""Synthesis benchmarks: retrieval at corpus scale, retrieval in every script, and concurrent LLM calls.

    python -m moa.synth.benchmark retrieval [--sizes 10000 100000 1000000] [--compare-bm25s]
    python -m moa.synth.benchmark scripts
    python -m moa.synth.benchmark calls [--calls 1000] [--latency 0.2] [--concurrency 1 16]

Each prints a table and writes JSON (--output, default runs/bench/synth_<what>.json). Corpus-scale
retrieval runs each size in a fresh process, so that peak memory is that size's alone; its corpus
is synthetic: passages of 30 to 70 words drawn (Zipf) from a vocabulary of words in eight scripts
plus unspaced Chinese and Japanese runs. The calls benchmark runs a synthesis of exactly --calls
calls (one yes/no row each, over the ten cultures) against a chat server in its own process, which
counts the calls it answers; it reports wall time, calls/s, the run's CPU per call and the speed-up
over the first concurrency.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ALPHABETS = {"latin": "abcdefghijklmnopqrstuvwxyzäöüßéèàçñ", "cyrillic": "абвгдежзийклмнопрстуфхцчшщыэюя",
             "greek": "αβγδεζηθικλμνξοπρστυφχψω", "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
             "devanagari": "अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह"}
UNSPACED = {"chinese": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可",
            "japanese": "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"}


def synthetic_corpus(n: int, vocab_size: int = 200_000, seed: int = 0) -> tuple[list[str], list[str]]:
    """n passages and 200 queries (3 to 5 words of the same vocabulary)."""
    rng = np.random.default_rng(seed)
    scripts = list(ALPHABETS.values()) + list(UNSPACED.values())
    words = []
    for i in range(vocab_size):
        letters = scripts[i % len(scripts)]
        length = rng.integers(3, 9) if letters not in UNSPACED.values() else rng.integers(4, 12)
        words.append("".join(letters[j] for j in rng.integers(0, len(letters), length)))
    ranks = np.arange(1, vocab_size + 1)
    p = 1 / ranks ** 1.05
    p /= p.sum()
    lengths = rng.integers(30, 71, n)
    ids = rng.choice(vocab_size, size=int(lengths.sum()), p=p)
    passages, at = [], 0
    for length in lengths:
        passages.append(" ".join(words[i] for i in ids[at:at + length]))
        at += length
    queries = [" ".join(words[i] for i in rng.choice(vocab_size, size=rng.integers(3, 6), p=p)) for _ in range(200)]
    return passages, queries


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def retrieval_one(n: int, implementation: str) -> dict:
    """Build one index of n synthetic passages and time 200 queries (run in a fresh process)."""
    passages, queries = synthetic_corpus(n)
    before = _rss_mib()
    start = time.perf_counter()
    if implementation == "moa":
        from moa.synth.bm25 import BM25
        index = BM25(passages)
        search = lambda q: index.top(q, 5)
    else:
        import bm25s
        from moa.synth.bm25 import tokenize
        index = bm25s.BM25(k1=1.5, b=0.75)
        index.index([tokenize(p) for p in passages], show_progress=False)
        search = lambda q: index.retrieve([tokenize(q) or ["\0"]], k=5, show_progress=False)
    build = time.perf_counter() - start
    del passages
    latencies = []
    for q in queries:
        start = time.perf_counter()
        search(q)
        latencies.append(time.perf_counter() - start)
    ms = np.array(latencies) * 1000
    return {"implementation": implementation, "passages": n, "build_s": round(build, 1),
            "peak_rss_mib": round(_rss_mib()), "rss_growth_mib": round(_rss_mib() - before),
            "query_p50_ms": round(float(np.percentile(ms, 50)), 2), "query_p99_ms": round(float(np.percentile(ms, 99)), 2)}


def bench_retrieval(sizes, implementations) -> list[dict]:
    out = []
    for implementation in implementations:
        for n in sizes:
            done = subprocess.run([sys.executable, "-m", "moa.synth.benchmark", "_retrieval_one", str(n), implementation],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"retrieval benchmark at {n} passages ({implementation}) failed:\n{done.stderr}")
            out.append(json.loads(done.stdout.splitlines()[-1]))
            print(_table([out[-1]]).splitlines()[-1], flush=True)
    return out


def bench_scripts(corpus: Path, queries: Path) -> list[dict]:
    """Recall@1 and recall@5 per language of the multilingual test set (a corpus mixing all of them)."""
    from moa.synth.retrieval import LocalRetriever
    retriever = LocalRetriever(corpus=corpus)
    items = [json.loads(line) for line in queries.read_text(encoding="utf-8").splitlines()]
    out = []
    for language in dict.fromkeys(i["language"] for i in items):
        mine = [i for i in items if i["language"] == language]
        found = [[d["id"] for d in retriever.search(i["query"], None, 5)] for i in mine]
        out.append({"language": language, "queries": len(mine),
                    "recall@1": sum(f[:1] == i["relevant"][:1] for f, i in zip(found, mine)) / len(mine),
                    "recall@5": sum(len(set(f) & set(i["relevant"])) / len(i["relevant"])
                                    for f, i in zip(found, mine)) / len(mine)})
    return out


class _SlowChat(BaseHTTPRequestHandler):
    """A chat completions server taking `latency` seconds a call; each reply is one valid yes/no sample,
    told apart by the request's number (so every call gives a row). GET /count: the calls answered."""
    protocol_version = "HTTP/1.1"  # keep-alive, as API servers do
    disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart (delayed ACK)
    latency = 0.2
    answered = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(json.dumps({"calls": _SlowChat.answered}).encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.latency)
        with _SlowChat.lock:
            _SlowChat.answered += 1
            number = _SlowChat.answered
        sample = {"prompt": f"Someone does thing number {number}. Is this appropriate by local custom? Answer yes or no.",
                  "response": "yes"}
        content = json.dumps({"samples": [sample]})
        self._send(json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}],
                               "usage": {"prompt_tokens": len(body) // 4, "completion_tokens": 30,
                                         "total_tokens": 0}}).encode())


def serve_slow_chat(latency: float) -> None:
    """Serve _SlowChat on a free loopback port (printed on stdout) until killed."""
    _SlowChat.latency = latency
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowChat)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


def _answered(url: str) -> int:
    with urllib.request.urlopen(url + "/count", timeout=10) as reply:
        return json.load(reply)["calls"]


def bench_calls(calls: int, latency: float, concurrencies) -> list[dict]:
    """Wall time of a synthesis run of `calls` LLM calls (one yes/no row each, spread over the ten
    cultures) against a loopback server in its own process taking `latency` s a call."""
    from moa.data import CULTURES
    from moa.synth import pipeline
    from moa.synth.config import load_config
    if calls % len(CULTURES):
        raise SystemExit(f"--calls must be a multiple of {len(CULTURES)} (one job per culture), got {calls}")
    server = subprocess.Popen([sys.executable, "-m", "moa.synth.benchmark", "_serve", str(latency)],
                              stdout=subprocess.PIPE, text=True)
    out = []
    try:
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        for concurrency in concurrencies:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = load_config(None, output_dir=tmp, cultures=list(CULTURES), tasks=["yesno"], stage1_samples=0,
                                  samples_per_task=calls // len(CULTURES), samples_per_call=1, plot=False,
                                  llm={"backend": "openai", "model": "m", "base_url": url + "/v1",
                                       "concurrency": concurrency})
                before = _answered(url)
                start, cpu = time.perf_counter(), time.process_time()
                summary = pipeline.run(cfg, progress=False)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                made = _answered(url) - before
            if made != calls or summary["llm_calls"] != calls:
                raise SystemExit(f"expected {calls} calls, the server answered {made} and the run counted "
                                 f"{summary['llm_calls']}")
            out.append({"concurrency": concurrency, "calls": made, "latency_s": latency, "wall_s": round(wall, 1),
                        "calls_per_s": round(made / wall, 1),
                        "cpu_ms_per_call": round(1000 * cpu / made, 1)})
            print(_table([out[-1]]).splitlines()[-1], flush=True)
    finally:
        server.kill()
        server.wait()
    for row in out:
        row["speedup"] = round(out[0]["wall_s"] / row["wall_s"], 1)
    return out


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    fmt = lambda row: "  ".join(v.rjust(w) for v, w in zip(row, widths))
    return "\n".join([fmt(keys)] + [fmt(c) for c in cells])


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["_retrieval_one"]:
        print(json.dumps(retrieval_one(int(sys.argv[2]), sys.argv[3])))
        return 0
    if argv is None and sys.argv[1:2] == ["_serve"]:
        serve_slow_chat(float(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m moa.synth.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["retrieval", "scripts", "calls"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--compare-bm25s", action="store_true", help="also measure the bm25s package (if installed)")
    parser.add_argument("--corpus", type=Path, default=Path("tests/data/multilingual_corpus.jsonl"))
    parser.add_argument("--queries", type=Path, default=Path("tests/data/multilingual_queries.jsonl"))
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.what == "retrieval":
        rows = bench_retrieval(args.sizes, ["moa"] + (["bm25s"] if args.compare_bm25s else []))
    elif args.what == "scripts":
        rows = bench_scripts(args.corpus, args.queries)
    else:
        rows = bench_calls(args.calls, args.latency, args.concurrency)
    print(_table(rows))
    output = args.output or Path("runs/bench") / f"synth_{args.what}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(rows, indent=1))
    print(f"-> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
