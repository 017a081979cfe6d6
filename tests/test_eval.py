"""moa eval: batched label scoring and routing against a plain per-row loop, moa_router's abstention (threshold,
the rows' culture hints, fallback), the CLI end to end, bad input."""
import copy
import json

import pytest
import torch
from helpers import fresh_base, randomize_adapters

import moa
from moa.base_model import BaseModelConfig
from moa.cli import main as moa_main
from moa.data import LABELS, encode_example, encode_prompt, write_jsonl
from moa.eval import METHODS, evaluate, predict_labels
from moa.eval.scoring import row_labels
from moa.tiny import byte_tokenizer

CULTURES = ["japan", "india"]
ROWS = [
    {"id": "j1", "culture": "japan", "task": "mcq", "prompt": "After a meal, how much do diners tip?\nA) 15 percent\nB) nothing\n"
     "C) about 10 percent\nAnswer with one letter.", "response": "B", "label": "B"},
    {"id": "i1", "culture": "india", "task": "yesno", "prompt": "Eating with the right hand. Is this appropriate by local custom? "
     "Answer yes or no.", "response": "yes", "label": "yes"},
    {"id": "j2", "culture": "japan", "task": "offensive", "prompt": "Sticking chopsticks upright in rice. By local standards, "
     "is this offensive or not_offensive?", "response": "offensive", "label": "offensive"},
    {"id": "i2", "culture": "india", "task": "mcq", "prompt": "How do people greet elders?\nA) namaste\nB) a hug\n"
     "Answer with one letter.", "response": "A", "label": "A"},
    {"id": "j3", "culture": "japan", "task": "yesno", "prompt": "Bowing to greet. Is this appropriate by local custom? "
     "Answer yes or no.", "response": "yes", "label": "yes"},
    {"id": "i3", "culture": "india", "task": "offensive", "prompt": "Touching someone with your feet. By local standards, "
     "is this offensive or not_offensive?", "response": "offensive", "label": "offensive"},
    {"id": "j4", "culture": "japan", "task": "open", "prompt": "What is a common breakfast?", "response": "Rice, miso soup and fish."},
]
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def models():
    base = fresh_base("llama")
    model = moa.MoAForCausalLM.from_base(copy.deepcopy(base), moa.MoAConfig(cultures=CULTURES, r=4, alpha=8)).eval()
    randomize_adapters(model, std=0.3, seed=1)
    shared = moa.MoAForCausalLM.from_base(copy.deepcopy(base), moa.MoAConfig(cultures=["shared"], r=8, alpha=16)).eval()
    randomize_adapters(shared, std=0.3, seed=2)
    return model, shared, byte_tokenizer()


@pytest.fixture(scope="module")
def results(models):
    model, shared, tokenizer = models
    return evaluate(model, tokenizer, ROWS, shared_model=shared, batch_size=5, max_length=MAX_LENGTH,
                    min_router_confidence=0.0)  # the router decides every row


@torch.no_grad()
def score_alone(model, tokenizer, prompt, label, culture_id, routing):
    """Sum of the response tokens' log-probs for one row and one label: no batch, no padding."""
    example = encode_example(tokenizer, {"prompt": prompt, "response": label}, MAX_LENGTH)
    ids = torch.tensor([example["input_ids"]])
    cultures = None if culture_id is None else torch.tensor([culture_id])
    logp = model(input_ids=ids, culture_ids=cultures, routing=routing).logits[0].log_softmax(-1)
    return sum(float(logp[t - 1, token]) for t, token in enumerate(example["labels"]) if token != -100)


@torch.no_grad()
def routed_alone(model, tokenizer, prompt):
    """The router's culture for one prompt on its own (its last token, layer-averaged)."""
    ids, _ = model.route_sequences(torch.tensor([encode_prompt(tokenizer, prompt)]))
    return int(ids[0])


def reference_scores(models):
    model, shared, tokenizer = models
    scores = {m: [] for m in METHODS}
    for row in ROWS:
        if row["task"] not in LABELS:
            continue
        gold = CULTURES.index(row["culture"])
        name = {"japan": "Japan", "india": "India"}[row["culture"]]
        prefixed = f"Answer as a person from {name} would, by local norms.\n{row['prompt']}"
        setups = {"base": (model, row["prompt"], -1, "oracle"), "prompting": (model, prefixed, -1, "oracle"),
                  "shared_lora": (shared, row["prompt"], 0, "oracle"), "moa_oracle": (model, row["prompt"], gold, "oracle"),
                  "moa_router": (model, row["prompt"], routed_alone(model, tokenizer, row["prompt"]), "oracle"),
                  "moa_token": (model, row["prompt"], None, "router")}
        for method, (m, prompt, culture_id, routing) in setups.items():
            scores[method].append({label: score_alone(m, tokenizer, prompt, label, culture_id, routing)
                                   for label in row_labels(row)})
    return scores


def test_accuracy_matches_a_plain_loop(models, results):
    scores = reference_scores(models)
    label_rows = [r for r in ROWS if r["task"] in LABELS]
    assert results["n_label_rows"] == 6 and results["n_open_skipped"] == 1 and results["n_rows"] == 7
    assert set(results["accuracy"]) == set(METHODS)
    for method in METHODS:
        predicted = [max(s, key=s.get) for s in scores[method]]
        assert results["predictions"][method] == predicted, method
        correct = [p == r["label"] for p, r in zip(predicted, label_rows)]
        got = results["accuracy"][method]
        assert got["n"] == 6
        assert got["overall"] == pytest.approx(sum(correct) / 6)
        for culture in CULTURES:
            hits = [ok for ok, r in zip(correct, label_rows) if r["culture"] == culture]
            assert got["per_culture"][culture] == pytest.approx(sum(hits) / len(hits))
        for task in LABELS:
            hits = [ok for ok, r in zip(correct, label_rows) if r["task"] == task]
            assert got["per_task"][task] == pytest.approx(sum(hits) / len(hits))
    # the batched scores themselves, mixed cultures and padding in one batch
    model, _, tokenizer = models
    gold = [CULTURES.index(r["culture"]) for r in label_rows]
    _, batched = predict_labels(model, tokenizer, label_rows, gold, "oracle", batch_size=5, max_length=MAX_LENGTH)
    for got, want in zip(batched, scores["moa_oracle"]):
        assert got == pytest.approx(want, abs=1e-4)
    # the methods really differ
    assert abs(scores["moa_oracle"][0]["A"] - scores["base"][0]["A"]) > 1e-2
    assert abs(scores["moa_oracle"][0]["A"] - scores["shared_lora"][0]["A"]) > 1e-2


def test_routing_matches_route_sequences_row_by_row(models, results):
    model, _, tokenizer = models
    confusion = [[0, 0], [0, 0]]
    hits, counts = {}, {}
    for row in ROWS:
        ids = torch.tensor([encode_prompt(tokenizer, row["prompt"])])
        gold = CULTURES.index(row["culture"])
        routed, _ = model.route_sequences(ids)
        confusion[gold][int(routed)] += 1
        for position, choice in enumerate(model.route_probs(ids)[0].argmax(-1).tolist()):
            counts[position] = counts.get(position, 0) + 1
            hits[position] = hits.get(position, 0) + int(choice == gold)
    assert results["confusion"] == confusion
    assert results["routing_accuracy"] == pytest.approx((confusion[0][0] + confusion[1][1]) / len(ROWS))
    assert results["routing_by_position"]["count"] == [counts[p] for p in range(len(counts))]
    assert results["routing_by_position"]["accuracy"] == pytest.approx([hits[p] / counts[p] for p in range(len(counts))])
    assert results["cultures"] == CULTURES


def test_cli_end_to_end(models, results, tmp_path, capsys):
    model, shared, _ = models
    spec = BaseModelConfig(tiny={"family": "llama"}, seed=0)
    model.save_pretrained(tmp_path / "moa", base_spec=spec)
    shared.save_pretrained(tmp_path / "shared", base_spec=spec)
    write_jsonl(tmp_path / "test.jsonl", ROWS)
    out = tmp_path / "out"
    rc = moa_main(["eval", "--model", str(tmp_path / "moa"), "--data", str(tmp_path / "test.jsonl"), "--shared",
                   str(tmp_path / "shared"), "--output-dir", str(out), "--batch-size", "7", "--no-progress",
                   "--min-router-confidence", "0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| moa_router |" in printed and "open" in printed
    written = json.loads((out / "results.json").read_text())
    assert list(written["accuracy"]) == list(METHODS)
    for method in METHODS:
        assert written["predictions"][method] == results["predictions"][method]
        assert written["accuracy"][method]["overall"] == pytest.approx(results["accuracy"][method]["overall"])
    assert written["confusion"] == results["confusion"]
    assert (out / "results.md").read_text().startswith("# Evaluation")
    for name in ("confusion.png", "accuracy.png", "routing_by_position.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # --limit keeps the first rows; without --shared there is no shared_lora
    rc = moa_main(["eval", "--model", str(tmp_path / "moa"), "--data", str(tmp_path / "test.jsonl"), "--limit", "3",
                   "--output-dir", str(tmp_path / "out2"), "--no-progress"])
    assert rc == 0
    limited = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert limited["n_rows"] == 3 and "shared_lora" not in limited["accuracy"]


def test_moa_router_abstains_to_the_rows_hint_then_the_fallback(models, results, tmp_path, capsys):
    model, _, tokenizer = models
    hints = {0: {"culture_hint": "japan"}, 1: {"locale": "en-IN"}, 2: {"culture_hint": "japan"}, 3: {"locale": "hi"}}
    rows = [dict(row, **hints.get(i, {})) for i, row in enumerate(ROWS)]
    methods = ("base", "moa_oracle", "moa_router")
    label_index = [i for i, r in enumerate(ROWS) if r["task"] in LABELS]
    got = evaluate(model, tokenizer, rows, batch_size=5, max_length=MAX_LENGTH, methods=methods, min_router_confidence=1.0)
    assert got["decided_by"] == ["hint"] * 4 + ["fallback"] * 3  # at 1 the router abstains on every row
    assert got["router_confidence"] == pytest.approx(results["router_confidence"]) and got["routed"] == results["routed"]
    for j, i in enumerate(label_index):  # a hinted row runs its culture, the others the base model
        assert got["predictions"]["moa_router"][j] == got["predictions"]["moa_oracle" if i in hints else "base"][j], i
    router = got["accuracy"]["moa_router"]
    assert router["abstention"] == {"rate": 1.0, "n": 6, "accuracy": pytest.approx(router["overall"])}
    assert results["accuracy"]["moa_router"]["abstention"] == {"rate": 0.0, "n": 0, "accuracy": None}
    assert set(results["decided_by"]) == {"router"} and "abstention" not in results["accuracy"]["moa_oracle"]
    fallback = evaluate(model, tokenizer, ROWS, batch_size=5, max_length=MAX_LENGTH, methods=methods,
                        min_router_confidence=1.0, fallback_culture="japan")
    japan = predict_labels(model, tokenizer, [ROWS[i] for i in label_index], [0] * len(label_index), "oracle",
                           batch_size=5, max_length=MAX_LENGTH)[0]
    assert fallback["predictions"]["moa_router"] == japan
    # the CLI reads the rows' hints and reports the abstention as columns of the accuracy table
    model.save_pretrained(tmp_path / "moa", base_spec=BaseModelConfig(tiny={"family": "llama"}, seed=0))
    write_jsonl(tmp_path / "hinted.jsonl", rows)
    assert moa_main(["eval", "--model", str(tmp_path / "moa"), "--data", str(tmp_path / "hinted.jsonl"), "--output-dir",
                     str(tmp_path / "out"), "--no-progress", "--min-router-confidence", "1"]) == 0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["decided_by"] == got["decided_by"] and written["accuracy"]["moa_router"]["abstention"]["rate"] == 1.0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| method | overall (n=6) | abstained | abstained accuracy |" in table
    assert f"| moa_router | {router['overall']:.3f} | 1.000 | {router['overall']:.3f} |" in table
    assert "| moa_oracle | " in table and "| - | - |" in table
    assert "4 decided by the hint, 3 decided by the fallback" in capsys.readouterr().out
    write_jsonl(tmp_path / "bad.jsonl", [dict(ROWS[0], locale="fr-FR")])
    assert moa_main(["eval", "--model", str(tmp_path / "moa"), "--data", str(tmp_path / "bad.jsonl"), "--output-dir",
                     str(tmp_path / "out2"), "--no-progress"]) == 2
    assert "row 0 (id 'j1'): locale 'fr-FR' maps to none of this model's cultures" in capsys.readouterr().err


def test_culture_outside_the_model_is_named(models, tmp_path, capsys):
    model, shared, tokenizer = models
    bad = ROWS[:2] + [dict(ROWS[2], culture="germany", id="g1")]
    with pytest.raises(ValueError, match="'germany'.*'g1'|'g1'.*'germany'"):
        evaluate(model, tokenizer, bad)
    with pytest.raises(ValueError, match="exactly one culture named 'shared'"):
        evaluate(model, tokenizer, ROWS, shared_model=model)
    model.save_pretrained(tmp_path / "moa", base_spec=BaseModelConfig(tiny={"family": "llama"}, seed=0))
    write_jsonl(tmp_path / "bad.jsonl", bad)
    rc = moa_main(["eval", "--model", str(tmp_path / "moa"), "--data", str(tmp_path / "bad.jsonl"),
                   "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "germany" in err and str(CULTURES) in err
    assert not (tmp_path / "out").exists()
