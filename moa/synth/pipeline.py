"""The synthesis pipeline: jobs per (culture, task), resumable, written as schema-valid JSONL.

For every culture there is one stage-1 job (broad cultural knowledge, task "open") and one
stage-2 job per task. A job walks its queries, retrieves passages, asks the LLM backend for
samples in the task's format (calls are cached), validates them and stops at its target. A
finished job is saved under OUTPUT/work/parts/, so a rerun skips it; an interrupted job reruns
from the cache. Then rows are balanced across cultures, split (the test split holds out whole
norms) and written:

    OUTPUT/stage1_train.jsonl  stage1_validation.jsonl
    OUTPUT/stage2_train.jsonl  stage2_validation.jsonl  stage2_test.jsonl
    OUTPUT/summary.json  (OUTPUT/summary.png)  synth_config.json (the config in use)
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from moa.atomic import atomic_file
from moa.data import norms
from moa.data.schema import CULTURES, TASKS, write_jsonl
from moa.errors import UsageError
from moa.synth.backends import Backend, BackendError, OpenAIBackend, TransformersBackend
from moa.synth.cache import CallCache, cache_key
from moa.synth.config import SynthConfig
from moa.synth.offline import OfflineBackend
from moa.synth.prompting import ReplyError, SynthRequest, build_messages, parse_reply
from moa.synth.queries import make_queries
from moa.synth.retrieval import Retriever, make_retriever
from moa.synth.tasks import load_task, load_tasks
from moa.synth.validate import Validator

OUTPUT_FILES = {(1, "train"): "stage1_train.jsonl", (1, "validation"): "stage1_validation.jsonl",
                (2, "train"): "stage2_train.jsonl", (2, "validation"): "stage2_validation.jsonl",
                (2, "test"): "stage2_test.jsonl"}


@dataclass(frozen=True)
class Job:
    stage: int
    culture: str
    task: str
    target: int

    @property
    def name(self) -> str:
        return f"stage{self.stage}-{self.culture}-{self.task}"


def _unit(*parts) -> float:
    """A stable pseudo-random number in [0, 1) for the given parts."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _write_json(path: Path, obj) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=1, allow_nan=False)


def make_backend(llm, seed: int = 0) -> Backend:
    """The LLM backend an `llm` config section (moa.synth.config) describes: offline, openai or transformers."""
    options = {k: v for k, v in asdict(llm).items()
               if k not in ("backend", "batch", "batch_poll_s", "input_price_per_1m", "output_price_per_1m")}
    if llm.backend == "offline":
        return OfflineBackend(seed=seed, **options)
    if llm.backend == "openai":
        return OpenAIBackend(**options)
    if llm.backend == "transformers":
        return TransformersBackend(**options)
    raise UsageError(f"unknown llm backend {llm.backend!r}: expected 'offline', 'openai' or 'transformers'")


class Deferred(Exception):
    """A call left for the Batch API: its job waits for the batch's replies."""


class Caller:
    """Sends requests to the backend through the cache, at most `backend.concurrency` at once, and
    stops the run after too many failures in a row.

    With `defer` set (a dict), a call not in the cache is recorded there (key -> request) for the
    Batch API instead of being made; a call whose line failed in more than backend.max_retries
    batches (the cache records them) fails instead, as a backend_error reject of its job."""

    def __init__(self, backend: Backend, cache: CallCache | None, max_consecutive_errors: int, prices=(None, None)):
        self.backend, self.cache = backend, cache
        self.max_errors, self.errors_in_a_row = max_consecutive_errors, 0
        self.stopped = None  # the error that stops the run, once too many calls failed in a row
        self.slots = asyncio.Semaphore(backend.concurrency)
        self.defer = None
        self.calls = self.in_flight = self.prompt_tokens = self.completion_tokens = 0
        self.prices = prices  # per million prompt and completion tokens
        self.on_change = lambda: None

    def key(self, request: SynthRequest) -> str:
        return cache_key(self.backend.identity(), request.key())

    def cost(self) -> float | None:
        if None in self.prices:
            return None
        return (self.prompt_tokens * self.prices[0] + self.completion_tokens * self.prices[1]) / 1e6

    def count(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.calls += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def _failure(self, e: BackendError) -> None:
        self.errors_in_a_row += 1
        if self.errors_in_a_row >= self.max_errors:
            self.stopped = UsageError(f"stopping after {self.errors_in_a_row} failed LLM calls in a row "
                                      f"(finished jobs are kept; rerun to resume). Last error: {e}")
            raise self.stopped from None
        raise e

    async def __call__(self, request: SynthRequest) -> str:
        key = self.key(request)
        if self.cache is not None:
            reply = self.cache.get(key)
            if reply is not None:
                return reply
        if self.defer is not None:
            failures = self.cache.failures(key)
            if len(failures) > self.backend.max_retries:
                raise BackendError(f"failed in {len(failures)} batches, last: {failures[-1]}")
            self.defer[key] = request
            raise Deferred(key)
        async with self.slots:
            if self.stopped is not None:  # no call waiting for a slot is made after the stop
                raise self.stopped
            self.in_flight += 1
            self.on_change()
            try:
                reply = await self.backend.generate(request)
            except BackendError as e:
                self._failure(e)
            finally:
                self.in_flight -= 1
        self.errors_in_a_row = 0
        self.count(reply.prompt_tokens, reply.completion_tokens)
        if self.cache is not None:
            self.cache.put(key, reply.text)
        self.on_change()
        return reply.text


async def _requests(job: Job, spec, cfg: SynthConfig, retriever: Retriever):
    """The job's (query, passages, request) in order, round after round; request is None without passages.

    Retrieval runs in a thread, so a web search waiting on the network never holds up the event loop."""
    culture = norms.cultures()[job.culture]
    queries = make_queries(culture, spec if job.stage == 2 else None, cfg.broad_queries,
                           languages=cfg.query_languages, native=cfg.native_queries)
    found = {}  # query text -> (passages, messages): retrieved and written once, asked again each round
    for round_ in range(cfg.max_rounds):
        for query in queries:
            if query.text not in found:
                passages = await asyncio.to_thread(retriever.search, query.text, job.culture, cfg.retrieval.top_k)
                messages = build_messages(spec, culture, passages, cfg.samples_per_call, job.stage) if passages else None
                found[query.text] = passages, messages
            passages, messages = found[query.text]
            if not passages:
                yield query, passages, None
                continue
            request = SynthRequest(job.culture, job.task, job.stage, cfg.samples_per_call, query.text, passages,
                                   round=round_, seed=cfg.seed, messages=messages)
            yield query, passages, request


async def run_job(job: Job, spec, cfg: SynthConfig, retriever: Retriever, caller: Caller,
                  on_row=lambda: None) -> dict | None:
    """Generate up to job.target valid rows; returns rows, reject counts and the surplus (None when
    calls were deferred to the Batch API).

    Calls run ahead of the replies being read: as many as the rows still missing need if every
    sample were valid. Replies are read in request order, so which calls are made and which rows
    are kept never depend on how many run at once or in which order they finish."""
    validator = Validator(spec, job.culture)
    items = _requests(job, spec, cfg, retriever)
    window, rows, rejects, surplus = deque(), [], Counter(), 0
    deferred = False

    async def fill():
        needed = -(-(job.target - len(rows)) // cfg.samples_per_call)
        while sum(task is not None for _, _, task in window) < needed:
            item = await anext(items, None)
            if item is None:
                return
            query, passages, request = item
            window.append((query, passages, asyncio.ensure_future(caller(request)) if request else None))

    try:
        while len(rows) < job.target:
            await fill()
            if not window:
                break
            query, passages, task = window.popleft()
            if task is None:
                rejects["no_passages"] += 1
                continue
            try:
                samples = parse_reply(await task)
            except Deferred:
                deferred = True
                break
            except BackendError:
                rejects["backend_error"] += 1
                continue
            except ReplyError:
                rejects["malformed_reply"] += 1
                continue
            for sample in samples:
                fields, reason = validator.check(sample)
                if reason:
                    rejects[reason] += 1
                elif len(rows) >= job.target:
                    surplus += 1
                else:
                    rows.append(_row(job, fields, query, passages, caller.backend.source))
                    on_row()
    finally:
        tasks = [task for _, _, task in window if task is not None]
        if not deferred:  # calls no longer needed; deferred ones all record themselves for the batch
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await items.aclose()
    if deferred:
        return None
    return {"rows": rows, "rejects": dict(rejects), "surplus": surplus}


def _row(job: Job, fields: dict, query, passages: list, source: str) -> dict:
    digest = hashlib.sha1(f"{job.stage}|{fields['prompt']}".encode()).hexdigest()[:12]
    row = {"id": f"{job.culture}-{job.task}-{digest}", "culture": job.culture, "task": job.task,
           "prompt": fields["prompt"], "response": fields["response"]}
    if "label" in fields:
        row["label"] = fields["label"]
    row["stage"] = job.stage
    if isinstance(fields.get("norm"), str) and fields["norm"]:
        row["norm"] = fields["norm"]
    if isinstance(fields.get("cue"), bool):
        row["cue"] = fields["cue"]
    evidence = fields.get("evidence")
    doc_ids = evidence if isinstance(evidence, list) and evidence else [p["id"] for p in passages]
    row["source"] = source
    row["provenance"] = {"query": query.text, "query_kind": query.kind, "doc_ids": doc_ids}
    return row


def split_key(row: dict) -> str:
    """What the test split holds out: the row's norm, or else the first document it is grounded in."""
    return row.get("norm") or "doc:" + row["provenance"]["doc_ids"][0]


def choose_test_keys(keys: set, fraction: float, seed: int) -> set:
    """A `fraction` of the keys, chosen separately among norm questions, taboos and documents."""
    question_ids = {q.id for q in norms.questions()}
    taboo_ids = {t.id for t in norms.taboos()}
    groups = {"question": [], "taboo": [], "doc": []}
    for key in keys:
        groups["question" if key in question_ids else "taboo" if key in taboo_ids else "doc"].append(key)
    test = set()
    for members in groups.values():
        members.sort(key=lambda k: _unit(seed, "test", k))
        test.update(members[:round(fraction * len(members))])
    return test


def assign_splits(rows: list, cfg: SynthConfig) -> tuple[list, set, int]:
    """Set each row's split. Returns (rows, held-out norm keys, rows dropped).

    `test_split: norms` holds out whole norms (their stage-1 rows are dropped), so the test asks
    about customs never trained on. `test_split: rows` holds out stage-2 rows: the test asks
    unseen questions (another cue, phrasing or option order) about customs that training covers;
    a test row whose prompt also occurs in training is dropped.
    """
    if cfg.test_split == "norms":
        test_keys = choose_test_keys({split_key(r) for r in rows if r["stage"] == 2}, cfg.test_fraction, cfg.seed)
        is_test = lambda row: split_key(row) in test_keys
    else:
        test_keys = set()
        is_test = lambda row: row["stage"] == 2 and _unit(cfg.seed, "test", row["id"]) < cfg.test_fraction
    kept, dropped = [], 0
    for row in rows:
        if is_test(row):
            if row["stage"] == 1:
                dropped += 1
                continue
            row["split"] = "test"
        else:
            row["split"] = "validation" if _unit(cfg.seed, "validation", row["id"]) < cfg.validation_fraction else "train"
        kept.append(row)
    seen = {r["prompt"] for r in kept if r["split"] != "test"}
    unseen = [r for r in kept if r["split"] != "test" or r["prompt"] not in seen]
    return unseen, test_keys, dropped + len(kept) - len(unseen)


def balance(results: dict, jobs: list) -> dict:
    """Cut every culture's rows of a task to the smallest culture's count; returns job name -> rows cut."""
    cut = {}
    for stage, task in {(j.stage, j.task) for j in jobs}:
        group = [j for j in jobs if (j.stage, j.task) == (stage, task)]
        smallest = min(len(results[j.name]["rows"]) for j in group)
        for j in group:
            cut[j.name] = len(results[j.name]["rows"]) - smallest
            results[j.name]["rows"] = results[j.name]["rows"][:smallest]
    return cut


def _prepare_output(cfg: SynthConfig, fresh: bool) -> Path:
    work = cfg.output_dir / "work"
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
        for name in list(OUTPUT_FILES.values()) + ["summary.json", "summary.png", "synth_config.json"]:
            (cfg.output_dir / name).unlink(missing_ok=True)
    state = work / "state.json"
    fingerprint = json.loads(json.dumps(cfg.fingerprint(), default=str))
    if state.exists():
        if json.loads(state.read_text(encoding="utf-8")) != fingerprint:
            raise UsageError(f"{cfg.output_dir} holds a run made with a different config; pass --fresh to "
                             f"start over or choose another --output-dir")
    else:
        _write_json(state, fingerprint)
    _write_json(cfg.output_dir / "synth_config.json", json.loads(json.dumps(asdict(cfg), default=str)))
    return work


def run(cfg: SynthConfig, fresh: bool = False, progress: bool = True, backend: Backend | None = None,
        retriever: Retriever | None = None) -> dict:
    """Run (or resume) a synthesis; returns the summary that is also written to summary.json."""
    start = time.perf_counter()
    work = _prepare_output(cfg, fresh)
    specs = load_tasks(cfg.task_dir, cfg.tasks)
    stage1_spec = specs["open"] if "open" in specs else load_task(cfg.task_dir / "open.yaml")
    retriever = retriever or make_retriever(cfg.retrieval)
    backend = backend or make_backend(cfg.llm, seed=cfg.seed)
    cache = CallCache(work / "cache.sqlite") if cfg.cache else None
    prices = (getattr(cfg.llm, "input_price_per_1m", None), getattr(cfg.llm, "output_price_per_1m", None))
    batch = getattr(cfg.llm, "batch", False)
    if batch and cache is None:
        raise UsageError("llm.batch needs cache: true (the batch's replies reach the jobs through the cache)")
    caller = Caller(backend, cache, cfg.max_consecutive_errors, tuple(p / 2 if p is not None and batch else p
                                                                      for p in prices))
    cultures = [c for c in CULTURES if c in cfg.cultures]
    tasks = [t for t in TASKS if t in cfg.tasks]
    jobs = [Job(1, c, "open", cfg.stage1_samples) for c in cultures if cfg.stage1_samples > 0]
    jobs += [Job(2, c, t, cfg.samples_per_task) for c in cultures for t in tasks]
    results, resumed = {}, 0
    for job in jobs:
        part = work / "parts" / f"{job.name}.json"
        if part.exists():
            results[job.name] = json.loads(part.read_text(encoding="utf-8"))
            resumed += 1
    try:
        while True:
            todo = [j for j in jobs if j.name not in results]
            if batch:
                caller.defer = {}
            bar = tqdm(total=sum(j.target for j in todo), desc="synth", unit="row", disable=not progress or not todo)
            try:
                asyncio.run(_run_jobs(todo, cfg, specs, stage1_spec, retriever, caller, work, results, bar))
            finally:
                bar.close()
            if not caller.defer:
                break
            from moa.synth.batch import run_batch
            run_batch(backend, caller, work, poll_s=cfg.llm.batch_poll_s, progress=progress)
    finally:
        if cache is not None:
            cache.close()
    short = {j.name: len(results[j.name]["rows"]) for j in jobs if len(results[j.name]["rows"]) < j.target}
    cut = balance(results, jobs) if cfg.balance else {}
    rows = [row for job in jobs for row in results[job.name]["rows"]]
    rows, test_keys, held_out = assign_splits(rows, cfg)
    order = {c: i for i, c in enumerate(CULTURES)}
    rows.sort(key=lambda r: (r["stage"], order[r["culture"]], TASKS.index(r["task"]), r["id"]))
    files = {}
    for (stage, split), name in OUTPUT_FILES.items():
        part_rows = [r for r in rows if r["stage"] == stage and r["split"] == split]
        if stage == 1 and not cfg.stage1_samples:
            continue
        write_jsonl(cfg.output_dir / name, part_rows)
        files[name] = len(part_rows)
    summary = _summary(cfg, jobs, results, rows, files, short, cut, test_keys, held_out, caller, resumed)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    _write_json(cfg.output_dir / "summary.json", summary)
    return summary


def _progress_text(caller: Caller, rejects: Counter) -> str:
    tokens = caller.prompt_tokens + caller.completion_tokens
    text = (f"calls {caller.calls} done/{caller.in_flight} in flight, rejects {sum(rejects.values())}, "
            f"tokens {tokens / 1000:.1f}k")
    cost = caller.cost()
    return text + (f", ~${cost:.2f}" if cost is not None else "")


async def _run_jobs(todo, cfg, specs, stage1_spec, retriever, caller, work, results, bar) -> None:
    """Run the jobs at once (their calls share the caller's slots); each finished job is saved to work/parts."""
    caller.slots = asyncio.Semaphore(caller.backend.concurrency)
    rejects = Counter()
    caller.on_change = lambda: bar.set_postfix_str(_progress_text(caller, rejects), refresh=False)

    async def one(job):
        spec = stage1_spec if job.stage == 1 else specs[job.task]
        result = await run_job(job, spec, cfg, retriever, caller, on_row=lambda: bar.update(1))
        if result is not None:
            rejects.update(result["rejects"])
            bar.update(job.target - len(result["rows"]))
            _write_json(work / "parts" / f"{job.name}.json", result)
            results[job.name] = result

    running = [asyncio.ensure_future(one(job)) for job in todo]
    try:
        await asyncio.gather(*running)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def _summary(cfg, jobs, results, rows, files, short, cut, test_keys, held_out, caller, resumed) -> dict:
    counts = {c: {} for c in dict.fromkeys(j.culture for j in jobs)}
    for row in rows:
        column = "stage1" if row["stage"] == 1 else row["task"]
        counts[row["culture"]][column] = counts[row["culture"]].get(column, 0) + 1
    rejects = {c: {} for c in counts}
    totals = Counter()
    for job in jobs:
        column = "stage1" if job.stage == 1 else job.task
        job_rejects = Counter(results[job.name]["rejects"])
        if cut.get(job.name):
            job_rejects["balance"] += cut[job.name]
        rejects[job.culture][column] = dict(job_rejects)
        totals.update(job_rejects)
    if held_out:
        totals["dropped_for_test_split"] += held_out
    splits = Counter(f"stage{r['stage']}_{r['split']}" for r in rows)
    return {"output_dir": str(cfg.output_dir), "backend": cfg.llm.backend, "retrieval": cfg.retrieval.backend,
            "files": files, "counts": counts, "splits": dict(splits), "rejects": rejects,
            "rejects_total": dict(totals), "short_jobs": short, "test_norms": sorted(test_keys),
            "llm_calls": caller.calls, "tokens": {"prompt": caller.prompt_tokens, "completion": caller.completion_tokens},
            "cost_usd": None if caller.cost() is None else round(caller.cost(), 4),
            "jobs_resumed": resumed, "jobs": len(jobs)}
