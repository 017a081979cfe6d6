"""Generation for a list of prompt rows: left-padded batches in which every row has its own culture.

A row is `{"prompt": str, "culture": optional culture name, "id": optional}`, and under routing 'prompt'
optionally a culture hint, `"culture_hint"` (a culture name) and/or `"locale"` (a language tag such as
`ja-JP`), run when the router abstains (moa.infer.culture_choice). Rows are batched by
prompt length (longest first, so a batch pads little) and come back in input order. Each batch
is one `model.generate` call: the rows' cultures mix inside every forward pass, KV cache on.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from moa.config import ROUTING_MODES
from moa.data import DataError, encode_prompt, padding_id
from moa.data.padding import pad_batch
from moa.data.schema import json_lines
from moa.errors import UsageError
from moa.infer.culture_choice import (DEFAULT_MIN_CONFIDENCE, CultureDecision, HintError, check_fallback,
                                      check_min_confidence, decide, request_hint)
from moa.infer.sampling import SamplingError, SamplingParams

# 'prompt': the router's pick for each prompt (its choice at the last prompt token) runs the whole
# row, prompt and answer, as a server routes a request; the others are the model's own modes
GENERATE_ROUTING = ("prompt",) + ROUTING_MODES
PROMPT_KEYS = ("prompt", "culture", "id", "culture_hint", "locale")
HINT_KEYS = ("culture_hint", "locale")


def row_problems(row, cultures: list[str], routing: str) -> list[str]:
    """Everything wrong with one prompt row, as messages naming the bad value and what was expected."""
    if not isinstance(row, dict):
        return [f"expected a JSON object with a 'prompt', got {type(row).__name__}"]
    problems = []
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        problems.append(f"field 'prompt' must be a non-empty string, got {prompt!r}")
    culture = row.get("culture")
    if culture is None:
        if routing == "oracle":
            problems.append("routing 'oracle' needs a 'culture' on every row, this row has none")
    elif culture not in cultures:
        problems.append(f"unknown culture {culture!r}: expected one of {list(cultures)}")
    given = [key for key in HINT_KEYS if row.get(key) is not None]
    if given and routing != "prompt":
        problems.append(f"a culture hint ({' and '.join(repr(k) for k in given)}) only applies under routing 'prompt' "
                        f"(it runs when the router abstains), got routing {routing!r}")
    elif given:
        try:
            row_hint(row, cultures)
        except HintError as e:
            problems.append(str(e))
    return problems


def row_hint(row: dict, cultures: list[str]) -> str | None:
    """The culture a row hints at: its culture_hint, else its locale mapped through the locale table; HintError
    for a hint it cannot use."""
    return request_hint(cultures, row.get("culture_hint"), row.get("locale"))


def read_prompts(path, cultures: list[str], routing: str = "prompt") -> list[dict]:
    """Read and check a JSONL file of prompt rows (keys PROMPT_KEYS only); DataError lists every bad line as file:line."""
    problems, rows = [], []
    for number, row in json_lines(path, problems):
        bad = row_problems(row, cultures, routing)
        unknown = sorted(set(row) - set(PROMPT_KEYS)) if isinstance(row, dict) else []
        if unknown:
            bad.append(f"unknown keys {unknown}: expected only {list(PROMPT_KEYS)}")
        problems.extend((str(path), number, message) for message in bad)
        if not bad:
            rows.append(row)
    if problems:
        raise DataError(problems)
    if not rows:
        raise DataError([(str(path), 0, "no prompt rows: expected one JSON object per line")])
    return rows


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a generation: the base model's generation config's and the tokenizer's EOS."""
    ids = set()
    config = getattr(model.base_model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return ids


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[:position + 1]
    return tokens


def sampling_kwargs(do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> dict:
    """transformers `generate` keyword arguments for these sampling settings, checked and normalised as the
    server does (moa.infer.sampling): UsageError naming a value outside its range; a temperature below
    GREEDY_BELOW is greedy."""
    try:
        params = SamplingParams(temperature=temperature, top_p=top_p)
    except SamplingError as e:
        raise UsageError(str(e)) from None
    return params.generate_kwargs() if do_sample else {"do_sample": False}


def fit_context(encoded: list[list[int]], rows: list[dict], context: int | None, max_new_tokens: int,
                truncate: str | None) -> list[list[int]]:
    """The prompts' token ids, each checked to leave `max_new_tokens` of the model's `context` positions:
    a longer prompt is refused (naming its row), or with truncate='left' cut to its last tokens."""
    if context is None:
        return encoded
    room = context - max_new_tokens
    if room < 1:
        raise UsageError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} positions: expected at most {context - 1}")
    if truncate == "left":
        return [ids[-room:] for ids in encoded]
    for i, ids in enumerate(encoded):
        if len(ids) > room:
            raise UsageError(f"row {i} (id {rows[i].get('id', i)!r}): the prompt is {len(ids)} tokens, but the model's "
                             f"context of {context} positions minus max_new_tokens {max_new_tokens} leaves {room}: "
                             f"shorten it, lower --max-new-tokens or pass --truncate left")
    return encoded


def generate_rows(model, tokenizer, rows: list[dict], routing: str = "prompt", batch_size: int = 16,
                  max_new_tokens: int = 64, top_k: int | None = None, progress: bool = False,
                  truncate: str | None = None, min_router_confidence: float = DEFAULT_MIN_CONFIDENCE,
                  fallback_culture: str | None = None, **sampling) -> list[dict]:
    """Generate for every row; one output dict per row, in input order.

    routing: 'prompt' (the culture moa.infer.culture_choice.decide gives runs the whole row: the router's pick
    for the prompt when its probability is at least `min_router_confidence`, else the row's culture hint, else
    `fallback_culture`, None for the base model),
    'oracle' (each row's own culture, required on every row), 'router' (the gate's top-1 per token)
    or 'topk' (the renormalised mix of the `top_k` best adapters per token).
    `sampling` goes to transformers `generate` (do_sample, temperature, top_p, ...). A prompt longer
    than the model's context minus `max_new_tokens` is refused, or with truncate='left' keeps its last tokens.
    Output keys: id (given, else the row's position), prompt, culture (given or None), text (the
    new tokens decoded, special tokens skipped), routed_culture (the culture that ran the row: the given
    culture in 'oracle' mode, the decided one, "base" included, in 'prompt' mode, the router's choice for the
    prompt under 'router' and 'topk'), decided_by ("request" in 'oracle' mode, "router" | "hint" | "fallback"
    in 'prompt' mode, "router" under the per-token modes), router_confidence and router_choice (the router's
    sequence-level pick and its probability, in every mode), new_tokens.
    """
    cultures = model.config.cultures
    if routing not in GENERATE_ROUTING:
        raise UsageError(f"unknown routing {routing!r}: expected one of {GENERATE_ROUTING}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if top_k is not None and not 1 <= top_k <= len(cultures):
        raise UsageError(f"top_k must be between 1 and the run's {len(cultures)} cultures, got {top_k}")
    check_min_confidence(min_router_confidence)
    check_fallback(fallback_culture, cultures)
    checked = sampling_kwargs(sampling.pop("do_sample", False), sampling.pop("temperature", 1.0), sampling.pop("top_p", 1.0))
    sampling.update(checked)
    problems = [f"row {i}: {message}" for i, row in enumerate(rows) for message in row_problems(row, cultures, routing)]
    if problems:
        raise UsageError("bad prompt rows:\n  " + "\n  ".join(problems))
    pad = padding_id(tokenizer)
    eos = eos_ids(model, tokenizer)
    encoded = fit_context([encode_prompt(tokenizer, row["prompt"]) for row in rows], rows,
                          getattr(model.base_model.config, "max_position_embeddings", None), max_new_tokens, truncate)
    order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    results: list[dict | None] = [None] * len(rows)
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        ids, mask = pad_batch([encoded[i] for i in batch], pad, left=True, device=model.device)
        router_ids, confidence = model.route_sequences(ids, mask)
        picks = [cultures[int(c)] for c in router_ids]
        if routing == "oracle":
            decisions = [CultureDecision(rows[i]["culture"], float(confidence[j]), "request") for j, i in enumerate(batch)]
        elif routing == "prompt":
            decisions = [decide(picks[j], float(confidence[j]), row_hint(rows[i], cultures), min_router_confidence,
                                fallback_culture) for j, i in enumerate(batch)]
        else:  # the gates pick per token
            decisions = [CultureDecision(picks[j], float(confidence[j]), "router") for j in range(len(batch))]
        culture_ids = None
        if routing in ("oracle", "prompt"):
            culture_ids = torch.tensor([-1 if d.culture is None else cultures.index(d.culture) for d in decisions],
                                       device=model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, culture_ids=culture_ids,
                             routing="oracle" if routing == "prompt" else routing, top_k=top_k,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
        for j, i in enumerate(batch):
            tokens = _until_eos(out[j, ids.shape[1]:].tolist(), eos)
            moa = decisions[j].fields()
            results[i] = {
                "id": rows[i].get("id", i),
                "prompt": rows[i]["prompt"],
                "culture": rows[i].get("culture"),
                "text": tokenizer.decode(tokens, skip_special_tokens=True),
                "routed_culture": moa["culture"],
                "decided_by": moa["decided_by"],
                "router_confidence": moa["router_confidence"],
                "router_choice": picks[j],
                "new_tokens": len(tokens),
            }
    return results
