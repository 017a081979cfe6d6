"""Label accuracy per method and culture, and routing accuracy, of a MoA model on labelled rows.

A label task row is scored by putting every label of its task in the response slot and summing
the log-probabilities of the response tokens (EOS included); the best-scoring label is the
prediction. A multiple-choice row's labels are the option letters its prompt shows (`row_labels`). Rows x labels are scored in padded batches that mix cultures, one forward per batch.

Methods:
  base         the base model (culture id -1, no adapter)
  prompting    the base model, the prompt prefixed with a sentence naming the row's culture
  shared_lora  one LoRA trained on every culture (a run whose only culture is "shared")
  moa_oracle   MoA with each row's own culture adapter
  moa_router   MoA with the culture `moa serve` runs for an `auto` request (moa.infer.culture_choice.decide):
               the adapter the router picks for the prompt (its choice at the last prompt token, as
               `route_sequences` reads it) when its probability is at least `min_router_confidence`, else
               the row's culture hint (`culture_hint`, else `locale`), else the fallback culture or the base
               model, running the whole row; the rows below the threshold are its abstained rows
  moa_token    MoA with per-token routing: every token runs the adapter its gates pick (routing='router')
"""
from __future__ import annotations

import re

import torch
from tqdm import tqdm

from moa.data import IGNORE_INDEX, LABELS, encode_example, encode_prompt, padding_id
from moa.data.norms import cultures as bundled_cultures
from moa.data.padding import pad, pad_batch
from moa.errors import UsageError
from moa.infer.culture_choice import (DEFAULT_MIN_CONFIDENCE, HintError, check_fallback, check_min_confidence, decide,
                                      request_hint)

METHODS = ("base", "prompting", "shared_lora", "moa_oracle", "moa_router", "moa_token")
SHARED_CULTURE = "shared"
OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[).:]\s", re.MULTILINE)  # "A) ...", "A. ...", "(A) ...", "A: ..."


def row_labels(row: dict) -> list[str]:
    """The labels a row is scored over: its task's labels; for a multiple-choice row only the letters of
    the options its prompt shows (a three-option question is not scored on "D"), unless the prompt
    shows no option line or not the gold letter, then all of them."""
    labels = LABELS[row["task"]]
    if row["task"] != "mcq":
        return labels
    shown = [letter for letter in labels if letter in set(OPTION_LINE.findall(row["prompt"]))]
    return shown if row.get("label", row["response"]) in shown else labels


def culture_name(culture: str) -> str:
    """The display name of a culture: the bundled name, else the id in title case."""
    known = bundled_cultures()
    return known[culture].name if culture in known else culture.replace("_", " ").title()


def cultural_prompt(prompt: str, culture: str) -> str:
    """The prompt behind a sentence asking for the culture's view (the `prompting` baseline)."""
    return f"Answer as a person from {culture_name(culture)} would, by local norms.\n{prompt}"


@torch.no_grad()
def sequence_logprobs(model, examples: list[dict], culture_ids: list[int] | None, routing: str, batch_size: int,
                      pad_id: int, progress: bool = False, desc: str = "score") -> list[float]:
    """Sum of log-probs of the supervised tokens (labels != -100) of each example.

    examples: `{"input_ids", "labels"}` as from `encode_example`; culture_ids: one per example
    (None with routing='router'). Right padding, one forward per `batch_size` examples.
    """
    scores = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = examples[start:start + batch_size]
        ids, mask = pad_batch([e["input_ids"] for e in batch], pad_id, device=model.device)
        labels = pad([e["labels"] for e in batch], IGNORE_INDEX, device=model.device)
        cultures = None if culture_ids is None else torch.tensor(culture_ids[start:start + batch_size])
        logits = model(input_ids=ids, attention_mask=mask, culture_ids=cultures, routing=routing, use_cache=False).logits
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        picked = logits[:, :-1][keep].float().log_softmax(-1)
        token_logp = picked.gather(1, targets[keep][:, None]).squeeze(1)
        rows = torch.arange(len(batch), device=keep.device)[:, None].expand_as(keep)[keep]
        scores += torch.zeros(len(batch), device=keep.device).index_add_(0, rows, token_logp).tolist()
    return scores


def predict_labels(model, tokenizer, rows: list[dict], culture_ids: list[int] | None, routing: str, batch_size: int,
                   max_length: int, prompting: bool = False, progress: bool = False, desc: str = "score"):
    """(predicted label per row, {label: score} per row) for label-task rows.

    prompting: prefix each prompt with `cultural_prompt` for the row's culture.
    """
    examples, owners = [], []
    for i, row in enumerate(rows):
        if row["task"] not in LABELS:
            raise UsageError(f"row {i} has task {row['task']!r}: expected a label task, one of {sorted(LABELS)}")
        prompt = cultural_prompt(row["prompt"], row["culture"]) if prompting else row["prompt"]
        for label in row_labels(row):
            examples.append(encode_example(tokenizer, {"prompt": prompt, "response": label}, max_length))
            owners.append((i, label))
    pair_cultures = None if culture_ids is None else [culture_ids[i] for i, _ in owners]  # None: routing='router'
    flat = sequence_logprobs(model, examples, pair_cultures, routing, batch_size, padding_id(tokenizer), progress, desc)
    scores = [{} for _ in rows]
    for (i, label), score in zip(owners, flat):
        scores[i][label] = score
    predictions = [max(s, key=s.get) for s in scores]
    return predictions, scores


@torch.no_grad()
def route_rows(model, tokenizer, rows: list[dict], batch_size: int, max_length: int, progress: bool = False):
    """The router on each row's formatted prompt (its last `max_length` tokens).

    Returns (culture id per row at its last prompt token, as `route_sequences` reads it, the router's
    probability of that culture, per-position argmax ids: a list per row over its prompt tokens).
    """
    sequence_ids, confidences, token_ids = [], [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="route", unit="batch", disable=not progress):
        prompts = [encode_prompt(tokenizer, r["prompt"])[-max_length:] for r in rows[start:start + batch_size]]
        ids, mask = pad_batch(prompts, padding_id(tokenizer), device=model.device)
        probability, choice = model.route_probs(ids, mask).max(-1)
        for p, row_choice, row_probability in zip(prompts, choice.tolist(), probability.tolist()):
            token_ids.append(row_choice[:len(p)])
            sequence_ids.append(row_choice[len(p) - 1])
            confidences.append(row_probability[len(p) - 1])
    return sequence_ids, confidences, token_ids


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def accuracy_summary(correct: list[bool], rows: list[dict], cultures: list[str]) -> dict:
    """Accuracy of `correct` (one bool per row of `rows`) overall, per culture and per label task, with counts;
    a culture or task with no row is left out."""
    by_culture = {c: [ok for ok, r in zip(correct, rows) if r["culture"] == c] for c in cultures}
    tasks = [t for t in LABELS if any(r["task"] == t for r in rows)]
    return {
        "overall": _share(correct),
        "per_culture": {c: _share(hits) for c, hits in by_culture.items() if hits},
        "per_task": {t: _share([ok for ok, r in zip(correct, rows) if r["task"] == t]) for t in tasks},
        "n": len(correct),
        "n_per_culture": {c: len(hits) for c, hits in by_culture.items() if hits},
    }


def check_rows(rows: list[dict], cultures: list[str]) -> list[str | None]:
    """Every row's culture must be one of the model's, and its culture hint (`culture_hint`, `locale`) one the
    model can run; returns the hints (a culture or None per row), raises UsageError naming the first bad row."""
    if not rows:
        raise UsageError("no rows to evaluate")
    hints = []
    for i, row in enumerate(rows):
        where = f"row {i}" + (f" (id {row['id']!r})" if "id" in row else "")
        if row["culture"] not in cultures:
            count = sum(r["culture"] not in cultures for r in rows)
            raise UsageError(f"{where} has culture {row['culture']!r}, which is not one of the model's cultures "
                             f"{cultures} ({count} row(s) with cultures outside the model)")
        try:
            hints.append(request_hint(cultures, row.get("culture_hint"), row.get("locale")))
        except HintError as e:
            raise UsageError(f"{where}: {e}") from None
    return hints


def abstention_summary(correct: list[bool], abstained: list[bool]) -> dict:
    """How often the router abstained (`rate` of the rows, `n`) and the accuracy of the rows it abstained on."""
    hits = [ok for ok, out in zip(correct, abstained) if out]
    return {"rate": _share(abstained), "n": len(hits), "accuracy": _share(hits)}


def evaluate(model, tokenizer, rows: list[dict], shared_model=None, batch_size: int = 32, max_length: int = 256,
             progress: bool = False, methods: tuple = METHODS, min_router_confidence: float = DEFAULT_MIN_CONFIDENCE,
             fallback_culture: str | None = None) -> dict:
    """Label accuracy of every method of `methods`, the router's culture per row (`routed`) and its
    probability (`router_confidence`), what decided `moa_router`'s culture per row (`decided_by`),
    routing accuracy, routing by position and routing confusion.

    rows: dicts as from `moa.data.load_jsonl`; `open` rows count for routing only; a row's `culture_hint` or
    `locale` is its hint. shared_model: a MoA model whose only culture is "shared" (the `shared_lora`
    baseline, left out when None). `moa_router` runs the router's pick when its probability is at least
    `min_router_confidence`, else the row's hint, else `fallback_culture` (None: the base model); its
    accuracy entry adds `abstention` (rate, n and accuracy of the label rows below the threshold).
    The models are put in eval mode.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown methods {unknown}: expected a subset of {METHODS}")
    cultures = list(model.config.cultures)
    check_min_confidence(min_router_confidence, "min_router_confidence")
    check_fallback(fallback_culture, cultures)
    hints = check_rows(rows, cultures)
    if shared_model is not None and list(shared_model.config.cultures) != [SHARED_CULTURE]:
        raise UsageError(f"the shared LoRA model must have exactly one culture named {SHARED_CULTURE!r}, "
                         f"got {list(shared_model.config.cultures)}")
    for m in (model, shared_model):
        if m is not None:
            m.eval()

    routed, confidence, by_token = route_rows(model, tokenizer, rows, batch_size, max_length, progress)
    decisions = [decide(cultures[c], p, hint, min_router_confidence, fallback_culture)
                 for c, p, hint in zip(routed, confidence, hints)]
    label_index = [i for i, r in enumerate(rows) if r["task"] in LABELS]
    label_rows = [rows[i] for i in label_index]
    gold = [r.get("label", r["response"]) for r in label_rows]
    gold_ids = [cultures.index(r["culture"]) for r in label_rows]
    routed_ids = [-1 if decisions[i].culture is None else cultures.index(decisions[i].culture) for i in label_index]
    runs = {
        "base": (model, [-1] * len(label_rows), "oracle", False),
        "prompting": (model, [-1] * len(label_rows), "oracle", True),
        "shared_lora": (shared_model, [0] * len(label_rows), "oracle", False),
        "moa_oracle": (model, gold_ids, "oracle", False),
        "moa_router": (model, routed_ids, "oracle", False),  # the router's pick, else the hint, else the fallback
        "moa_token": (model, None, "router", False),  # the adapter the gates pick, token by token
    }
    accuracy, predictions = {}, {}
    for method, (scorer, ids, routing, prompting) in runs.items():
        if scorer is None or not label_rows or method not in methods:
            continue
        predicted, _ = predict_labels(scorer, tokenizer, label_rows, ids, routing, batch_size, max_length,
                                      prompting=prompting, progress=progress, desc=method)
        predictions[method] = predicted
        accuracy[method] = accuracy_summary([p == g for p, g in zip(predicted, gold)], label_rows, cultures)
        if method == "moa_router":
            abstained = [decisions[i].decided_by != "router" for i in label_index]
            accuracy[method]["abstention"] = abstention_summary([p == g for p, g in zip(predicted, gold)], abstained)

    row_ids = [cultures.index(r["culture"]) for r in rows]
    confusion = [[0] * len(cultures) for _ in cultures]
    for g, p in zip(row_ids, routed):
        confusion[g][p] += 1
    width = max(len(t) for t in by_token)
    hits, counts = [0] * width, [0] * width
    for g, choices in zip(row_ids, by_token):
        for position, choice in enumerate(choices):
            counts[position] += 1
            hits[position] += int(choice == g)
    return {
        "accuracy": accuracy,
        "predictions": predictions,
        "routed": routed,
        "router_confidence": confidence,
        "decided_by": [d.decided_by for d in decisions],
        "min_router_confidence": min_router_confidence,
        "fallback_culture": fallback_culture,
        "routing_accuracy": sum(g == p for g, p in zip(row_ids, routed)) / len(rows),
        "routing_by_position": {"accuracy": [h / c for h, c in zip(hits, counts)], "count": counts},
        "confusion": confusion,
        "cultures": cultures,
        "n_rows": len(rows),
        "n_label_rows": len(label_rows),
        "n_open_skipped": len(rows) - len(label_rows),
    }
