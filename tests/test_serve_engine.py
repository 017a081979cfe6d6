"""The serving engine: continuous batching equals `moa generate` and each request run alone; cancel,
queue, cache bound and shutdown behave as the HTTP server relies on."""
import threading
import time

import pytest
import torch
from helpers import fresh_base, randomize_adapters

import moa
from moa.data import encode_prompt
from moa.infer import generate_rows
from moa.serve.engine import Engine, QueueFull, Request, SamplingParams
from moa.tiny import byte_tokenizer

CULTURES = ["japan", "india", "nigeria"]
PROMPTS = ["Tea?", "What do people eat for breakfast here?", "Greet an elder.", "How is a guest welcomed at home?",
           "Gifts", "Which hand do you eat with at a shared meal?"]
TINY = {"family": "llama", "vocab_size": 131}  # byte ids 3..130: every token decodes to visible ASCII


@pytest.fixture(scope="module")
def model():
    model = moa.MoAForCausalLM.from_base(fresh_base(**TINY), moa.MoAConfig(cultures=CULTURES, r=4, alpha=8)).eval()
    randomize_adapters(model, std=0.2, seed=1)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


class Collector:
    """Events of several requests, by key; `wait` until every submitted request is done."""

    def __init__(self):
        self.events, self.lock, self.open = {}, threading.Lock(), 0
        self.all_done = threading.Event()

    def callback(self, key):
        with self.lock:
            self.events[key], self.open = [], self.open + 1
            self.all_done.clear()

        def on_event(event):
            with self.lock:
                self.events[key].append(event)
                if event.kind == "done":
                    self.open -= 1
                    if self.open == 0:
                        self.all_done.set()
        return on_event

    def wait(self, timeout=60):
        assert self.all_done.wait(timeout), "requests did not finish"

    def tokens(self, key):
        return [e.token_id for e in self.events[key] if e.kind == "token"]

    def text(self, key):
        return "".join(e.text for e in self.events[key] if e.kind == "token")

    def routed(self, key):
        return next(e for e in self.events[key] if e.kind == "routed")

    def finish(self, key):
        return self.events[key][-1].finish_reason


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def run(engine, requests, gap_s=0.0):
    """Submit (key, Request) pairs `gap_s` apart to a started engine; the collector once all are done."""
    got = Collector()
    for key, request in requests:
        engine.submit(request, got.callback(key))
        time.sleep(gap_s)
    got.wait()
    return got


def run_alone(model, tokenizer, request):
    engine = Engine(model, tokenizer, max_batch_size=1)
    engine.start()
    got = run(engine, [(0, request)])
    assert engine.shutdown(10)
    return got.tokens(0), got.routed(0).culture


def assert_same_or_near_tie(model, request, culture, tokens, alone):
    """Equal greedy tokens; where they differ, the alone run's top-2 logits are within 1e-3 there."""
    if tokens == alone:
        return
    first = next(i for i, (a, b) in enumerate(zip(tokens, alone)) if a != b)
    ids = torch.tensor([request.prompt_ids + alone[:first]])
    culture_id = -1 if culture == "base" else CULTURES.index(culture)
    with torch.no_grad():
        logits = model(input_ids=ids, culture_ids=[culture_id], routing="oracle").logits[0, -1]
    top = logits.topk(2).values
    assert float(top[0] - top[1]) < 1e-3, f"tokens differ at {first} without a near tie: {tokens} vs {alone}"


def test_greedy_equals_generate_rows(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4, prefill_chunk=8)
    engine.start()
    oracle = [{"prompt": p, "culture": CULTURES[i % 3]} for i, p in enumerate(PROMPTS)]
    requests = [(("oracle", i), Request(encode_prompt(tokenizer, row["prompt"]), row["culture"], greedy(12)))
                for i, row in enumerate(oracle)]
    requests += [(("auto", i), Request(encode_prompt(tokenizer, p), "auto", greedy(12))) for i, p in enumerate(PROMPTS)]
    got = run(engine, requests, gap_s=0.005)  # later requests join a batch already decoding
    assert engine.shutdown(10)
    expected = {"oracle": generate_rows(model, tokenizer, oracle, routing="oracle", max_new_tokens=12),
                "auto": generate_rows(model, tokenizer, [{"prompt": p} for p in PROMPTS], routing="prompt",
                                      max_new_tokens=12)}
    for (mode, i), _ in requests:
        row = expected[mode][i]
        assert got.text((mode, i)) == row["text"]
        assert len(got.tokens((mode, i))) == row["new_tokens"]  # EOS included, as generate_rows counts it
        assert got.finish((mode, i)) == ("length" if row["new_tokens"] == 12 else "stop")
        assert got.routed((mode, i)).culture == row["routed_culture"]
        assert got.routed((mode, i)).router_confidence == pytest.approx(row["router_confidence"], abs=1e-5)
    assert engine.stats()["steps"] < 2 * 12 * len(PROMPTS)  # requests decoded together, not one by one


def test_base_is_the_model_without_adapters(model, tokenizer):
    engine = Engine(model, tokenizer)
    engine.start()
    prompt = encode_prompt(tokenizer, PROMPTS[1])
    got = run(engine, [("base", Request(prompt, "base", greedy(10))), ("japan", Request(prompt, "japan", greedy(10)))])
    assert engine.shutdown(10)
    ids = torch.tensor([prompt])
    plain = model.base_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                      do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert got.tokens("base") == plain and got.routed("base").culture == "base"
    assert got.tokens("japan") != plain  # the adapters change the output: the base row really ran without one
    assert engine.stats()["per_culture"]["base"] == {"requests": 1, "tokens": 10}


def test_concurrent_requests_each_equal_alone(model, tokenizer):
    names = CULTURES + ["auto", "base"]
    requests = [(i, Request(encode_prompt(tokenizer, PROMPTS[i % len(PROMPTS)] * (1 + i % 3)), names[i % len(names)],
                            greedy(4 + 3 * (i % 5)))) for i in range(15)]
    engine = Engine(model, tokenizer, max_batch_size=6, prefill_chunk=16)
    engine.start()
    got = run(engine, requests, gap_s=0.002)
    assert engine.shutdown(10)
    for key, request in requests:
        alone, culture = run_alone(model, tokenizer, request)
        assert got.routed(key).culture == culture
        assert len(got.tokens(key)) == request.params.max_tokens
        assert_same_or_near_tie(model, request, culture, got.tokens(key), alone)
    stats = engine.stats()
    assert sum(c["requests"] for c in stats["per_culture"].values()) == len(requests)
    assert stats["finished"]["length"] == len(requests) and stats["first_tokens"] == len(requests)


def test_new_requests_prefill_together_long_prompts_in_chunks(model, tokenizer):
    """Requests waiting at a step are prefilled in one left-padded forward when their prompts fit the
    step's budget; a longer prompt runs alone, chunk by chunk; every request equals itself run alone."""
    prompts = [encode_prompt(tokenizer, PROMPTS[i]) for i in range(4)]
    long_prompt = encode_prompt(tokenizer, " ".join(PROMPTS * 2))
    requests = [(i, Request(p, (CULTURES + ["auto"])[i], greedy(6))) for i, p in enumerate(prompts)]
    requests.append(("long", Request(long_prompt, "india", greedy(6))))
    chunk = sum(map(len, prompts)) + 8
    assert len(long_prompt) > chunk
    engine = Engine(model, tokenizer, max_batch_size=8, prefill_chunk=chunk)
    shapes = []
    hook = model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    got = Collector()
    try:
        for key, request in requests:  # all waiting before the first step
            engine.submit(request, got.callback(key))
        engine.start()
        got.wait()
    finally:
        hook.remove()
    assert engine.shutdown(10)
    assert shapes[0] == (4, max(map(len, prompts)))  # the four short prompts: one forward
    assert shapes[1] == (1, 8)  # the long prompt: the rest of the first step's budget, then chunks
    assert (1, chunk) in shapes
    for key, request in requests:
        alone, culture = run_alone(model, tokenizer, request)
        assert got.routed(key).culture == culture
        assert_same_or_near_tie(model, request, culture, got.tokens(key), alone)


def test_sampling_is_seeded_and_stop_strings_cut(model, tokenizer):
    engine = Engine(model, tokenizer)
    engine.start()
    prompt = encode_prompt(tokenizer, PROMPTS[3])
    sampled = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.9, seed=7)
    got = run(engine, [(k, Request(prompt, "india", sampled)) for k in ("a", "b")]
              + [("c", Request(prompt, "india", SamplingParams(max_tokens=16, temperature=1.5, seed=8))),
                 ("greedy", Request(prompt, "india", greedy(16)))])
    assert got.tokens("a") == got.tokens("b") != got.tokens("c")
    full = got.text("greedy")
    stop = full[5:7]
    cut = run(engine, [("stop", Request(prompt, "india", greedy(16, stop=("\x7f\x7f", stop))))])
    assert engine.shutdown(10)
    assert cut.text("stop") == full[:full.index(stop)] and cut.finish("stop") == "stop"


def test_cancel_leaves_at_the_next_step(model, tokenizer):
    engine = Engine(model, tokenizer)
    got = Collector()
    handles = {}

    def cancel_after_three(event):
        on_event(event)
        if event.kind == "token" and len(got.tokens("cancelled")) == 3:
            handles["cancelled"].cancel()
            got.steps_at_cancel = engine.stats()["steps"]

    on_event = got.callback("cancelled")
    handles["cancelled"] = engine.submit(Request(encode_prompt(tokenizer, PROMPTS[0]), "japan", greedy(50)),
                                         cancel_after_three)
    engine.submit(Request(encode_prompt(tokenizer, PROMPTS[1]), "india", greedy(20)), got.callback("other"))
    engine.start()
    got.wait()
    assert engine.shutdown(10)
    assert got.tokens("cancelled") and len(got.tokens("cancelled")) == 3 and got.finish("cancelled") == "cancelled"
    assert len(got.tokens("other")) == 20 and got.finish("other") == "length"
    stats = engine.stats()
    assert stats["finished"]["cancelled"] == 1 and stats["running"] == 0
    # the step after the cancel ran without the row: the other request kept decoding
    assert stats["steps"] > got.steps_at_cancel


def test_queue_full_and_bad_requests(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=2)
    prompt = encode_prompt(tokenizer, PROMPTS[0])
    got = Collector()
    for key in range(2):
        engine.submit(Request(prompt, "japan", greedy(4)), got.callback(key))
    with pytest.raises(QueueFull) as full:
        engine.submit(Request(prompt, "japan", greedy(4)), got.callback("rejected"))
    assert full.value.retry_after_s > 0 and engine.stats()["queue_depth"] == 2
    for request, field in ((Request(prompt, "france", greedy(4)), "model"),
                           (Request(prompt, "japan", greedy(engine.context_length)), "max_tokens"),
                           (Request([], "japan", greedy(4)), "prompt_ids")):
        with pytest.raises(ValueError, match=field):
            engine.submit(request, got.callback("bad"))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_tokens=4, top_p=0)
    engine.start()
    got.events.pop("rejected"), got.events.pop("bad")
    got.open = 2
    got.wait()
    assert engine.shutdown(10)
    assert [got.finish(key) for key in range(2)] == ["length", "length"]


def test_auto_abstains_to_the_hint_then_the_fallback_culture(model, tokenizer):
    """Below the router threshold an `auto` request runs its hint, else the fallback culture; each equals the same
    request naming that culture (same seed), and the routed event says what decided it."""
    engine = Engine(model, tokenizer, min_router_confidence=1.0, fallback_culture="nigeria")  # confidence < 1: abstains
    engine.start()
    prompt = encode_prompt(tokenizer, PROMPTS[2])
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=7)
    got = run(engine, [("hint", Request(prompt, "auto", params, hint="india")), ("india", Request(prompt, "india", params)),
                       ("fallback", Request(prompt, "auto", params)), ("nigeria", Request(prompt, "nigeria", params))])
    assert engine.shutdown(10)
    routed = {key: (got.routed(key).culture, got.routed(key).decided_by) for key in got.events}
    assert routed == {"hint": ("india", "hint"), "india": ("india", "request"), "fallback": ("nigeria", "fallback"),
                      "nigeria": ("nigeria", "request")}
    assert got.tokens("hint") == got.tokens("india") and got.tokens("fallback") == got.tokens("nigeria")
    assert 0 < got.routed("hint").router_confidence < 1
    assert engine.stats()["decided_by"] == {"router": 0, "hint": 1, "fallback": 1, "request": 2}
    with pytest.raises(ValueError, match="unknown culture hint 'france'"):
        engine.submit(Request(prompt, "auto", params, hint="france"), lambda event: None)
    with pytest.raises(ValueError, match="--fallback-culture 'france' is not one of the model's cultures"):
        Engine(model, tokenizer, fallback_culture="france")
    with pytest.raises(ValueError, match=r"min_router_confidence must be within \[0, 1\]"):
        Engine(model, tokenizer, min_router_confidence=1.5)


def test_cache_bound_is_respected(model, tokenizer):
    """max_cache_tokens is the KV cache's size: max_batch_size rows of max_cache_tokens / max_batch_size tokens;
    requests wait for a free row, and one that could outgrow its row is refused naming the setting."""
    requests = [(i, Request(encode_prompt(tokenizer, PROMPTS[i % len(PROMPTS)]), CULTURES[i % 3], greedy(8)))
                for i in range(9)]
    longest = max(len(r.prompt_ids) + r.params.max_tokens for _, r in requests)
    engine = Engine(model, tokenizer, max_batch_size=3, max_cache_tokens=3 * longest)
    engine.start()
    seen = []
    got = Collector()
    for key, request in requests:
        engine.submit(request, got.callback(key))
    while not got.all_done.wait(0.002):
        stats = engine.stats()
        seen.append(stats["running"] + stats["prefilling"])
    assert engine.shutdown(10)
    stats = engine.stats()
    assert 0 < stats["peak_cache_tokens"] <= 3 * longest and max(seen) == 3
    assert all(len(got.tokens(key)) == 8 if got.finish(key) == "length" else got.finish(key) == "stop"
               for key, _ in requests)  # every request ran to its end: max_tokens or EOS
    with pytest.raises(ValueError, match=f"exceed the {longest} tokens a request may hold \\(max_cache_tokens {3 * longest} / max_batch_size 3"):
        engine.submit(Request([5] * longest, "japan", greedy(8)), got.callback("big"))
    with pytest.raises(ValueError, match="max_cache_tokens 2 leaves no KV-cache token"):
        Engine(model, tokenizer, max_batch_size=3, max_cache_tokens=2)


def test_shutdown_lets_running_requests_finish(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=2)
    engine.start()
    got = Collector()
    for i in range(4):
        engine.submit(Request(encode_prompt(tokenizer, PROMPTS[i]), CULTURES[i % 3], greedy(10)), got.callback(i))
    assert engine.shutdown(30)
    assert all(got.finish(i) == "length" and len(got.tokens(i)) == 10 for i in range(4))
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(Request([5], "japan", greedy(1)), got.callback("late"))
    short = Engine(model, tokenizer)
    short.start()
    short.submit(Request(encode_prompt(tokenizer, PROMPTS[0]), "japan", greedy(1000)), got.callback("long"))
    assert not short.shutdown(0.2)  # past the timeout the request is ended, not left hanging
    assert got.finish("long") == "error" and "shut down" in got.events["long"][-1].message


def test_sampler_rows_fail_alone_and_plain_rows_pay_for_no_logprobs(monkeypatch):
    from moa.serve import sampler as sampler_module
    from moa.serve.sampler import RowState, Sampler

    calls = []
    real = sampler_module.top_entries
    monkeypatch.setattr(sampler_module, "top_entries", lambda *a: calls.append(1) or real(*a))
    logits = torch.randn(3, 11)
    logits[1, 4] = float("nan")
    rows = [RowState(SamplingParams(max_tokens=1, temperature=0.7, seed=s), torch.Generator().manual_seed(s), [])
            for s in range(3)]
    out = Sampler().sample(logits, rows)
    assert out[1].error and "not finite" in out[1].error
    assert out[0].error is None and out[2].error is None and not calls  # no logprobs asked: none computed
    alone = Sampler().sample(logits[2:], [RowState(rows[2].params, torch.Generator().manual_seed(2), [])])
    assert alone[0].token == out[2].token  # a seeded row draws the same token whatever shares its batch
    greedy_row = RowState(SamplingParams(max_tokens=1, temperature=1e-40, logprobs=3), torch.Generator(), [])
    sample = Sampler().sample(logits[:1], [greedy_row])[0]
    assert greedy_row.params.temperature == 0 and sample.token == int(logits[0].argmax()) and calls
    expected = logits[0].log_softmax(-1)
    assert sample.logprob == pytest.approx(float(expected[sample.token]), abs=1e-6)
    assert [t for t, _ in sample.top] == expected.topk(3).indices.tolist()


def test_penalties_and_logit_bias_change_only_their_rows(model, tokenizer):
    prompt = encode_prompt(tokenizer, PROMPTS[1])
    engine = Engine(model, tokenizer)
    engine.start()
    plain = greedy(12)
    banned = run_alone(model, tokenizer, Request(prompt, "india", plain))[0][0]
    got = run(engine, [("plain", Request(prompt, "india", plain)),
                       ("bias", Request(prompt, "india", greedy(12, logit_bias=((banned, -100.0),)))),
                       ("penalty", Request(prompt, "india", greedy(12, frequency_penalty=2.0, presence_penalty=2.0)))])
    assert engine.shutdown(10)
    assert banned not in got.tokens("bias")
    tokens = got.tokens("penalty")
    assert len(set(tokens)) > len(set(got.tokens("plain"))) or len(set(tokens)) == len(tokens)
    assert got.tokens("plain") == run_alone(model, tokenizer, Request(prompt, "india", plain))[0]


def test_a_failing_prefill_or_consumer_ends_only_its_own_request(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4)
    poison = encode_prompt(tokenizer, "poison")
    real = engine._prefill_together

    def prefill(seqs):
        if any(seq.prompt_ids == poison for seq in seqs):
            raise RuntimeError("prefill exploded")
        real(seqs)

    engine._prefill_together = prefill
    engine.start()
    got = Collector()
    engine.submit(Request(encode_prompt(tokenizer, PROMPTS[0]), "japan", greedy(30)), got.callback("running"))
    while not got.tokens("running"):
        time.sleep(0.005)
    engine.submit(Request(poison, "india", greedy(5)), got.callback("poison"))

    def explode(event):
        on_event(event)
        if event.kind == "token":
            raise ValueError("consumer exploded")
    on_event = got.callback("consumer")
    engine.submit(Request(encode_prompt(tokenizer, PROMPTS[2]), "india", greedy(5)), explode)
    got.wait()
    assert engine.shutdown(10)
    assert got.finish("poison") == "error" and "prefill exploded" in got.events["poison"][-1].message
    assert got.finish("consumer") == "cancelled"
    assert got.finish("running") == "length" and len(got.tokens("running")) == 30
    assert engine.stats()["failures"] == {"prefill": 1}


def test_requests_waiting_through_a_switch_resolve_against_the_new_run(model, tokenizer):
    """A request that waits while the engine switches runs is resolved against the new run's cultures: one naming a
    culture the new run lacks, or an `auto` one whose hint it lacks, ends with an error naming that culture; the
    others run on the new run. A run without the server's fallback culture is refused before anything changes."""
    new = moa.MoAForCausalLM.from_base(fresh_base(**TINY), moa.MoAConfig(cultures=["india", "nigeria", "egypt"], r=4,
                                                                         alpha=8)).eval()
    randomize_adapters(new, std=0.2, seed=2)
    engine = Engine(model, tokenizer, max_batch_size=1, min_router_confidence=1.0, fallback_culture="nigeria")
    no_fallback = moa.MoAForCausalLM.from_base(fresh_base(**TINY), moa.MoAConfig(cultures=["japan", "india"], r=4,
                                                                                 alpha=8)).eval()
    with pytest.raises(ValueError, match="no culture 'nigeria', the fallback culture this server runs with"):
        engine.switch(no_fallback)
    assert engine.cultures == CULTURES
    engine.start()
    got = Collector()
    prompt = encode_prompt(tokenizer, PROMPTS[1])
    engine.submit(Request(prompt, "japan", greedy(60, logit_bias=((tokenizer.eos_token_id, -100.0),))), got.callback("running"))
    while not got.tokens("running"):
        time.sleep(0.001)
    switcher = threading.Thread(target=engine.switch, args=(new,))
    switcher.start()
    while not engine.switching:
        time.sleep(0.001)
    waiting = {"named": Request(prompt, "japan", greedy(4)), "hinted": Request(prompt, "auto", greedy(4), hint="japan"),
               "kept": Request(prompt, "auto", greedy(4), hint="india"), "plain": Request(prompt, "auto", greedy(4))}
    for key, request in waiting.items():
        engine.submit(request, got.callback(key))
    switcher.join(60)
    got.wait()
    assert engine.shutdown(10)
    assert engine.cultures == ["india", "nigeria", "egypt"]
    assert got.finish("running") == "length" and len(got.tokens("running")) == 60  # finished on the old run
    for key in ("named", "hinted"):
        assert got.finish(key) == "error"
        assert "the server switched to a run without culture 'japan'" in got.events[key][-1].message
    routed = {key: (got.routed(key).culture, got.routed(key).decided_by) for key in ("kept", "plain")}
    assert routed == {"kept": ("india", "hint"), "plain": ("nigeria", "fallback")}
    alone, _ = run_alone(new, tokenizer, Request(prompt, "india", greedy(4)))
    assert got.tokens("kept") == alone  # ran on the new run's india adapter
