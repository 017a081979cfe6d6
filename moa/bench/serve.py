"""Serving under load: the continuous-batching engine against static batches and one culture at a time.

A load generator drives a server in-process: Poisson arrivals at given rates (requests/s) and a closed
loop of N clients (each sends its next request when the last one is done). Requests mix the cultures
uniformly; prompt and output lengths are drawn uniformly from given ranges; decoding is greedy and
every request runs its drawn output length (the bench's token-id "tokenizer" has no EOS).
Systems, each on the same load:
  moa      the engine (moa.serve.engine), MoA, cultures mixed in every step
  base     the same engine and load, every request on the base model (no adapter)
  static   MoA static batches of up to --max-batch-size requests: a batch forms from the requests
           waiting when the last one ended and runs (`model.generate`, as `moa generate` does) until its
           longest request is done
  single   one culture at a time through one adapter: static batches of the oldest waiting request's
           culture only (a server holding a single adapter)
  logprobs the moa engine on the same load, every request asking for `logprobs: 5` (its logprob and the
           top 5 per new token): what the logprobs cost
Reported per system and load: output tokens/s (median over --runs, and min..max), time to first token
and inter-token latency p50/p99 (pooled over the runs). Timings depend on the machine; tests never assert them.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import threading
import time

import torch

from moa.bench.common import add_model_arguments, llama_base, print_table, stamp, write_json
from moa.errors import UsageError
from moa.serve import openmp

SYSTEMS = ("moa", "base", "static", "single", "logprobs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--prompt-lengths", default="16,64", help="min,max prompt tokens")
    parser.add_argument("--output-lengths", default="8,128", help="min,max new tokens")
    parser.add_argument("--rates", default="2,8", help="comma-separated Poisson arrival rates (requests/s)")
    parser.add_argument("--clients", default="16", help="comma-separated closed-loop client counts")
    parser.add_argument("--requests", type=int, default=128,
                        help="requests per run: enough that the batch is full most of the run (with few, the last "
                             "long requests decode alone and the run measures its drain, not the steady state)")
    parser.add_argument("--runs", type=int, default=2, help="runs of every system and load")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench-serve.json", help="where to write the results")
    parser.add_argument("--plot", default="bench-serve.png", help="where to draw throughput and latency against load")


class TokenIds:
    """The bench's tokenizer: a token's text is its id; no EOS, so every request runs its drawn length."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f"{i} " for i in ids)


def _pair(text: str, name: str) -> tuple[int, int]:
    low, high = (int(v) for v in text.split(","))
    if not 1 <= low <= high:
        raise UsageError(f"--{name} must be 'min,max' with 1 <= min <= max, got {text!r}")
    return low, high


def build_model(args):
    import moa
    from moa.bench.e2e import TARGETS

    base = llama_base(args)
    base.generation_config.eos_token_id = None
    names = [f"culture{i}" for i in range(args.cultures)]
    model = moa.MoAForCausalLM.from_base(base, moa.MoAConfig(cultures=names, r=args.rank, alpha=2 * args.rank,
                                                             target_modules=TARGETS)).eval()
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.lora_B.normal_(std=0.01)
    return model


class StaticServer:
    """Static batching behind the engine's submit/event interface: a batch forms from the requests waiting
    when the last one ended and runs until its longest request is done; with `one_culture` a batch holds
    only the oldest waiting request's culture."""

    def __init__(self, model, max_batch_size: int, one_culture: bool):
        self.model, self.max_batch_size, self.one_culture = model, max_batch_size, one_culture
        self.waiting, self.lock = [], threading.Condition()
        self.stopping = False
        openmp.release_idle_threads()  # as the engine does before its step loop starts: the same conditions
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, request, on_event):
        with self.lock:
            self.waiting.append((request, on_event))
            self.lock.notify()

    def shutdown(self):
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join()

    def _take(self) -> list:
        culture = self.waiting[0][0].model
        batch = [item for item in self.waiting if not self.one_culture or item[0].model == culture][:self.max_batch_size]
        taken = {id(item) for item in batch}
        self.waiting = [item for item in self.waiting if id(item) not in taken]
        return batch

    def _loop(self):
        from moa.data.padding import pad_batch
        from moa.serve.engine import Event

        while True:
            with self.lock:
                while not self.waiting and not self.stopping:
                    self.lock.wait()
                if not self.waiting:
                    return
                batch = self._take()
            ids, mask = pad_batch([r.prompt_ids for r, _ in batch], 0, left=True, device=self.model.device)
            self.model.generate(input_ids=ids, attention_mask=mask, culture_ids=[r.model for r, _ in batch],
                                routing="oracle", do_sample=False, pad_token_id=0, streamer=_Stream(batch),
                                max_new_tokens=max(r.params.max_tokens for r, _ in batch))
            for _, on_event in batch:  # every request of the batch returns when its longest is done
                on_event(Event("done", finish_reason="length"))


class _Stream:
    """A transformers streamer sending each row's new token as an engine "token" event as it is made,
    up to the row's max_tokens."""

    def __init__(self, batch: list):
        self.batch, self.made = batch, -1  # the first `put` is the prompt

    def put(self, value):
        from moa.serve.engine import Event

        self.made += 1
        if self.made == 0:
            return
        for (request, on_event), token in zip(self.batch, value.tolist()):
            if self.made <= request.params.max_tokens:
                on_event(Event("token", token_id=token))

    def end(self):
        pass


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    q = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
    return q[0], q[1]


def drive(server, requests: list, load: tuple[str, float]) -> dict:
    """Send `requests` to `server` under `load` ("rate", requests/s) or ("clients", N); wait for all.
    Returns output tokens/s and the TTFT and inter-token latency samples (seconds)."""
    kind, value = load
    rng = random.Random(0)
    lock, finished = threading.Lock(), threading.Event()
    records = []
    pending = list(requests)

    def send():
        with lock:
            if not pending:
                return
            request = pending.pop(0)
            record = {"arrival": time.perf_counter(), "tokens": []}
            records.append(record)

        def on_event(event):
            if event.kind == "token":
                record["tokens"].append(time.perf_counter())
            elif event.kind == "done":
                with lock:
                    record["done"] = time.perf_counter()
                    if len(records) == len(requests) and all("done" in r for r in records):
                        finished.set()
                if kind == "clients":
                    send()
        server.submit(request, on_event)

    start = time.perf_counter()
    if kind == "clients":
        for _ in range(int(value)):
            send()
    else:
        arrival = start
        for _ in requests:
            arrival += rng.expovariate(value)
            time.sleep(max(0.0, arrival - time.perf_counter()))
            send()
    finished.wait()
    elapsed = max(r["done"] for r in records) - start
    tokens = sum(len(r["tokens"]) for r in records)
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens,
            "ttft": [r["tokens"][0] - r["arrival"] for r in records],
            "itl": [b - a for r in records for a, b in zip(r["tokens"], r["tokens"][1:])]}


def make_requests(args, names: list[str], run: int) -> list:
    from moa.serve.engine import Request, SamplingParams

    rng = random.Random(args.seed * 1000 + run)
    prompt, output = _pair(args.prompt_lengths, "prompt-lengths"), _pair(args.output_lengths, "output-lengths")
    return [Request([rng.randrange(args.vocab) for _ in range(rng.randint(*prompt))], rng.choice(names),
                    SamplingParams(max_tokens=rng.randint(*output), temperature=0)) for _ in range(args.requests)]


def run_system(system: str, model, args, requests: list, load) -> dict:
    from moa.serve.engine import Engine

    if system in ("static", "single"):
        server = StaticServer(model, args.max_batch_size, one_culture=system == "single")
        result = drive(server, requests, load)
        server.shutdown()
        return result
    if system == "base":
        requests = [dataclasses.replace(r, model="base") for r in requests]
    if system == "logprobs":
        requests = [dataclasses.replace(r, params=dataclasses.replace(r.params, logprobs=5)) for r in requests]
    engine = Engine(model, TokenIds(), max_batch_size=args.max_batch_size,
                    max_cache_tokens=args.max_batch_size * 4096)
    engine.start()
    result = drive(engine, requests, load)
    engine.shutdown(60)
    return result


def plot(results: list[dict], loads: list[str], path: str) -> None:
    from moa import plots

    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for system in dict.fromkeys(r["system"] for r in results):
        rows = [next(r for r in results if r["system"] == system and r["load"] == load) for load in loads]
        axes[0].plot(loads, [r["tokens_per_s"] for r in rows], marker="o", label=system)
        axes[1].plot(loads, [r["ttft_p50_s"] for r in rows], marker="o", label=system)
    axes[0].set(xlabel="load", ylabel="output tokens/s", title="throughput")
    axes[1].set(xlabel="load", ylabel="TTFT p50 (s)", title="time to first token", yscale="log")
    axes[0].legend()
    plots.save(fig, path)
    print(f"wrote {path}")


def run(args) -> int:
    from moa.atomic import check_output_file

    check_output_file(args.json, '"bench": "serve"')
    check_output_file(args.plot, "PNG")  # a PNG file: overwritten as an earlier plot
    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise UsageError(f"unknown systems {sorted(unknown)}: expected a subset of {SYSTEMS}")
    loads = [("rate", float(v)) for v in args.rates.split(",") if v] + [("clients", int(v)) for v in args.clients.split(",") if v]
    model = build_model(args)
    names = model.config.cultures
    run_system("moa", model, args, make_requests(args, names, -1)[:4], ("clients", 4))  # warm-up
    results = []
    for kind, value in loads:
        label = f"{value:g}/s" if kind == "rate" else f"{value} clients"
        samples = {system: [] for system in systems}
        for run_index in range(args.runs):
            requests = make_requests(args, names, run_index)
            for system in systems:  # systems alternate within a run: a drift of the machine falls on all
                print(f"[serve] {label}: run {run_index + 1}/{args.runs}, {system}", flush=True)
                samples[system].append(run_system(system, model, args, requests, (kind, value)))
        for system in systems:
            runs = samples[system]
            rates = sorted(r["tokens_per_s"] for r in runs)
            ttft = _percentiles([t for r in runs for t in r["ttft"]])
            itl = _percentiles([t for r in runs for t in r["itl"]])
            results.append({"system": system, "load": label, "load_kind": kind, "load_value": value, "runs": len(runs),
                            "tokens_per_s": statistics.median(rates),
                            "tokens_per_s_min": rates[0], "tokens_per_s_max": rates[-1],
                            "ttft_p50_s": ttft[0], "ttft_p99_s": ttft[1], "itl_p50_s": itl[0], "itl_p99_s": itl[1],
                            "tokens_per_s_runs": [r["tokens_per_s"] for r in runs],
                            "output_tokens_runs": [r["tokens"] for r in runs]})
    table = print_table(results, [("system", "system", "s"), ("load", "load", "s"), ("runs", "runs", "d"),
                                  ("tokens_per_s", "tokens/s", ".1f"), ("tokens_per_s_min", "min", ".1f"),
                                  ("tokens_per_s_max", "max", ".1f"), ("ttft_p50_s", "TTFT p50 s", ".3f"),
                                  ("ttft_p99_s", "TTFT p99 s", ".3f"), ("itl_p50_s", "ITL p50 s", ".4f"),
                                  ("itl_p99_s", "ITL p99 s", ".4f")])
    ratios = ratios_of(results)
    for name, value in ratios.items():
        print(f"{name}: " + ", ".join(f"{load} {ratio:.2f}" for load, ratio in value.items()))
    labels = list(dict.fromkeys(r["load"] for r in results))
    plot(results, labels, args.plot)
    write_json(args.json, {"bench": "serve", **stamp(), "args": vars(args), "results": results, "ratios": ratios,
                           "table": table, "plot": args.plot})
    return 0


def ratios_of(results: list[dict]) -> dict:
    """moa's tokens/s over each other system's, and logprobs' over moa's, per load (medians over the runs)."""
    by = {(r["system"], r["load"]): r["tokens_per_s"] for r in results}
    loads = list(dict.fromkeys(r["load"] for r in results))
    systems = {r["system"] for r in results}
    if "moa" not in systems:
        return {}
    ratios = {f"moa/{other}": {load: by[("moa", load)] / by[(other, load)] for load in loads}
              for other in ("base", "static", "single") if other in systems}
    if "logprobs" in systems:
        ratios["logprobs/moa"] = {load: by[("logprobs", load)] / by[("moa", load)] for load in loads}
    return ratios
