"""Generation for a list of prompt rows: left-padded batches in which every row has its own culture.

A row is `{"prompt": str, "culture": optional culture name, "id": optional}`. Rows are batched by
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

# 'prompt': the router's pick for each prompt (its choice at the last prompt token) runs the whole
# row, prompt and answer, as a server routes a request; the others are the model's own modes
GENERATE_ROUTING = ("prompt",) + ROUTING_MODES


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
    return problems


def read_prompts(path, cultures: list[str], routing: str = "prompt") -> list[dict]:
    """Read and check a JSONL file of prompt rows; DataError lists every bad line as file:line."""
    problems, rows = [], []
    for number, row in json_lines(path, problems):
        bad = row_problems(row, cultures, routing)
        problems.extend((str(path), number, message) for message in bad)
        if not bad:
            rows.append(row)
    if problems:
        raise DataError(problems)
    if not rows:
        raise DataError([(str(path), 0, "no prompt rows: expected one JSON object per line")])
    return rows


def _eos_ids(model, tokenizer) -> set[int]:
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


@torch.no_grad()
def generate_rows(model, tokenizer, rows: list[dict], routing: str = "prompt", batch_size: int = 16,
                  max_new_tokens: int = 64, top_k: int | None = None, progress: bool = False, **sampling) -> list[dict]:
    """Generate for every row; one output dict per row, in input order.

    routing: 'prompt' (the adapter the router picks for the row's prompt runs the whole row),
    'oracle' (each row's own culture, required on every row), 'router' (the gate's top-1 per token)
    or 'topk' (the renormalised mix of the `top_k` best adapters per token).
    `sampling` goes to transformers `generate` (do_sample, temperature, top_p, ...).
    Output keys: id (given, else the row's position), prompt, culture (given or None), text (the
    new tokens decoded, special tokens skipped), routed_culture (the given culture in 'oracle'
    mode, else the router's choice for the prompt), router_confidence and router_choice (the
    router's sequence-level pick and its probability, in every mode), new_tokens.
    """
    cultures = model.config.cultures
    if routing not in GENERATE_ROUTING:
        raise ValueError(f"unknown routing {routing!r}: expected one of {GENERATE_ROUTING}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    problems = [f"row {i}: {message}" for i, row in enumerate(rows) for message in row_problems(row, cultures, routing)]
    if problems:
        raise ValueError("bad prompt rows:\n  " + "\n  ".join(problems))
    pad = padding_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    encoded = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    results: list[dict | None] = [None] * len(rows)
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        ids, mask = pad_batch([encoded[i] for i in batch], pad, left=True, device=model.device)
        router_ids, confidence = model.route_sequences(ids, mask)
        culture_ids = None
        if routing == "oracle":
            culture_ids = torch.tensor([cultures.index(rows[i]["culture"]) for i in batch], device=model.device)
        elif routing == "prompt":
            culture_ids = router_ids
        out = model.generate(input_ids=ids, attention_mask=mask, culture_ids=culture_ids,
                             routing="oracle" if routing == "prompt" else routing, top_k=top_k,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
        routed = culture_ids if culture_ids is not None else router_ids
        for j, i in enumerate(batch):
            tokens = _until_eos(out[j, ids.shape[1]:].tolist(), eos)
            results[i] = {
                "id": rows[i].get("id", i),
                "prompt": rows[i]["prompt"],
                "culture": rows[i].get("culture"),
                "text": tokenizer.decode(tokens, skip_special_tokens=True),
                "routed_culture": cultures[int(routed[j])],
                "router_confidence": float(confidence[j]),
                "router_choice": cultures[int(router_ids[j])],
                "new_tokens": len(tokens),
            }
    return results
