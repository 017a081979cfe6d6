"""moa generate: mixed-culture batches equal rows run alone, oracle cultures differ, the culture decision under
--routing prompt (threshold, culture hint or locale, fallback), bad input named by line."""
import json

import pytest
import torch
from helpers import TEXT_TINY, save_text_run

from moa.base_model import load_moa
from moa.cli import main
from moa.data import encode_prompt
from moa.infer import generate_rows

CULTURES = ["japan", "india", "nigeria"]
PROMPTS = ["Tea?", "What do people eat for breakfast here?", "Greet an elder.", "How is a guest welcomed at home?",
           "Gifts", "Which hand do you eat with at a shared meal?"]


TINY = TEXT_TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_text_run(tmp_path_factory.mktemp("run") / "run", CULTURES)


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def generate(run_dir, tmp_path, rows, *extra, name="out"):
    prompts = write_prompts(tmp_path / f"{name}_prompts.jsonl", rows)
    out = tmp_path / f"{name}.jsonl"
    assert main(["generate", "--model", str(run_dir), "--prompts", str(prompts), "--output", str(out),
                 "--max-new-tokens", "8", "--no-progress", *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def assert_same(a, b):
    """Equal rows; the router's confidence may differ in the last float bits with the batch's padding."""
    assert [{k: v for k, v in r.items() if k != "router_confidence"} for r in a] == \
        [{k: v for k, v in r.items() if k != "router_confidence"} for r in b]
    assert [r["router_confidence"] for r in a] == pytest.approx([r["router_confidence"] for r in b], abs=1e-5)


def mixed_rows():
    return [{"prompt": p, "culture": CULTURES[i % 3], "id": f"r{i}"} for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("routing", ["prompt", "oracle", "router", "topk"])
def test_mixed_batch_equals_batch_size_one(run_dir, tmp_path, capsys, routing):
    rows = mixed_rows()
    mixed = generate(run_dir, tmp_path, rows, "--routing", routing, "--batch-size", "16", name="mixed")
    assert "tokens/s" in capsys.readouterr().out
    assert [r["id"] for r in mixed] == [row["id"] for row in rows]
    assert [r["prompt"] for r in mixed] == PROMPTS
    assert all(0 < r["router_confidence"] <= 1 and r["routed_culture"] in CULTURES + ["base"] for r in mixed)
    assert {r["decided_by"] for r in mixed} <= ({"request"} if routing == "oracle" else
                                                {"router", "fallback"} if routing == "prompt" else {"router"})
    assert all(r["new_tokens"] > 0 for r in mixed)
    single = generate(run_dir, tmp_path, rows, "--routing", routing, "--batch-size", "1", name="single")
    assert_same(single, mixed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.jsonl", "mixed_prompts.jsonl", "single.jsonl",
                                                          "single_prompts.jsonl"]


def test_oracle_mixed_batch_equals_each_culture_alone(run_dir, tmp_path):
    rows = mixed_rows()
    mixed = generate(run_dir, tmp_path, rows, "--routing", "oracle", name="mixed")
    assert [r["routed_culture"] for r in mixed] == [row["culture"] for row in rows]
    assert [r["culture"] for r in mixed] == [row["culture"] for row in rows]
    for culture in CULTURES:
        alone = generate(run_dir, tmp_path, [row for row in rows if row["culture"] == culture], "--routing", "oracle",
                         name=culture)
        assert_same(alone, [r for r in mixed if r["culture"] == culture])


def test_oracle_cultures_differ(run_dir, tmp_path):
    rows = [{"prompt": "Describe a wedding.", "culture": c} for c in CULTURES]
    out = generate(run_dir, tmp_path, rows, "--routing", "oracle", "--max-new-tokens", "12")
    texts = [r["text"] for r in out]
    assert len(set(texts)) == len(CULTURES), texts
    assert [r["id"] for r in out] == [0, 1, 2]
    # the router's view of the prompt is reported in every mode, and is the same for one prompt
    assert len({r["router_choice"] for r in out}) == 1


def test_library_matches_cli_and_sampling_is_seeded(run_dir, tmp_path):
    model, tokenizer = load_moa(run_dir)
    rows = [{"prompt": p} for p in PROMPTS[:4]]
    cli = generate(run_dir, tmp_path, rows, "--batch-size", "3", name="cli")
    assert_same(generate_rows(model, tokenizer, rows, batch_size=2, max_new_tokens=8), cli)
    sampled = [generate(run_dir, tmp_path, rows, "--do-sample", "--temperature", "1.5", "--seed", "3", name=f"s{i}")
               for i in range(2)]
    assert sampled[0] == sampled[1]
    assert all(r["culture"] is None for r in cli)


def test_bad_input(run_dir, tmp_path, capsys):
    out = tmp_path / "out.jsonl"

    def fails(lines, *extra):
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("\n".join(lines) + "\n")
        code = main(["generate", "--model", str(run_dir), "--prompts", str(prompts), "--output", str(out),
                     "--no-progress", *extra])
        assert code == 2
        assert not out.exists()
        return capsys.readouterr().err

    err = fails(['{"prompt": "hi", "culture": "japan"}', '', '{"prompt": "hi", "culture": "france"}'])
    assert f"{tmp_path / 'prompts.jsonl'}:3: unknown culture 'france'" in err
    assert "japan" in err and "nigeria" in err
    err = fails(['{"prompt": "hi", "culture": "japan"}', '{"prompt": "hi"}'], "--routing", "oracle")
    assert f"{tmp_path / 'prompts.jsonl'}:2: routing 'oracle' needs a 'culture' on every row" in err
    err = fails(['{"prompt": "hi"', '{"culture": "india"}'])
    assert "prompts.jsonl:1: not valid JSON" in err
    assert "prompts.jsonl:2: field 'prompt' must be a non-empty string" in err
    model, tokenizer = load_moa(run_dir)
    with pytest.raises(ValueError, match="row 1: routing 'oracle' needs a 'culture'"):
        generate_rows(model, tokenizer, [{"prompt": "a", "culture": "india"}, {"prompt": "b"}], routing="oracle")
    with pytest.raises(ValueError, match="unknown routing 'soft'"):
        generate_rows(model, tokenizer, [{"prompt": "a"}], routing="soft")


def test_culture_hint_locale_threshold_and_fallback(run_dir, tmp_path):
    rows = [{"prompt": PROMPTS[0], "culture_hint": "india"}, {"prompt": PROMPTS[1], "locale": "ja-JP"},
            {"prompt": PROMPTS[2], "culture_hint": "nigeria", "locale": "ja-JP"}, {"prompt": PROMPTS[3]}]
    named = generate(run_dir, tmp_path, [{"prompt": row["prompt"], "culture": culture} for row, culture in
                                         zip(rows, ["india", "japan", "nigeria", "nigeria"])], "--routing", "oracle", name="named")
    assert {r["decided_by"] for r in named} == {"request"}
    abstained = generate(run_dir, tmp_path, rows, "--min-router-confidence", "1", name="abstained")  # confidence < 1
    assert [(r["routed_culture"], r["decided_by"]) for r in abstained] == [
        ("india", "hint"), ("japan", "hint"), ("nigeria", "hint"), ("base", "fallback")]
    assert [r["text"] for r in abstained[:3]] == [r["text"] for r in named[:3]]
    model, tokenizer = load_moa(run_dir)
    ids = torch.tensor([encode_prompt(tokenizer, PROMPTS[3])])
    plain = model.base_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                      pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert abstained[3]["text"] == tokenizer.decode(plain, skip_special_tokens=True)
    fallback = generate(run_dir, tmp_path, rows[3:], "--min-router-confidence", "1", "--fallback-culture", "nigeria",
                        name="fallback")
    assert (fallback[0]["routed_culture"], fallback[0]["decided_by"], fallback[0]["text"]) == ("nigeria", "fallback",
                                                                                              named[3]["text"])
    routed = generate(run_dir, tmp_path, rows, "--min-router-confidence", "0", name="routed")  # the router always decides
    assert all(r["decided_by"] == "router" and r["routed_culture"] == r["router_choice"] for r in routed)
    assert [r["router_confidence"] for r in routed] == pytest.approx([r["router_confidence"] for r in abstained], abs=1e-6)


def test_bad_hints_and_threshold_settings_are_named(run_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "hi", "culture_hint": "japan"},
                                                        {"prompt": "hi", "culture_hint": "france"},
                                                        {"prompt": "hi", "locale": "fr-FR"}, {"prompt": "hi", "locale": "x!"}])

    def fails(*extra, path=prompts):
        code = main(["generate", "--model", str(run_dir), "--prompts", str(path), "--output", str(tmp_path / "out.jsonl"),
                     "--no-progress", *extra])
        assert code == 2 and not (tmp_path / "out.jsonl").exists()
        return capsys.readouterr().err

    err = fails()
    assert f"{prompts}:2: unknown culture hint 'france': expected one of {CULTURES}" in err
    assert f"{prompts}:3: locale 'fr-FR' maps to none of this model's cultures" in err
    assert f"{prompts}:4: locale 'x!' is not a language tag" in err
    oracle = write_prompts(tmp_path / "oracle.jsonl", [{"prompt": "hi", "culture": "japan", "locale": "ja-JP"}])
    assert "a culture hint ('locale') only applies under routing 'prompt'" in fails("--routing", "oracle", path=oracle)
    good = write_prompts(tmp_path / "good.jsonl", [{"prompt": "hi"}])
    assert "--min-router-confidence applies to --routing prompt only" in fails("--routing", "router",
                                                                                "--min-router-confidence", "0.3", path=good)
    assert "--min-router-confidence must be within [0, 1]" in fails("--min-router-confidence", "1.5", path=good)
    assert f"--fallback-culture 'france' is not one of the model's cultures {CULTURES}" in fails(
        "--fallback-culture", "france", path=good)
    model, tokenizer = load_moa(run_dir)
    with pytest.raises(ValueError, match="row 1: unknown culture hint 'france'"):
        generate_rows(model, tokenizer, [{"prompt": "a"}, {"prompt": "b", "culture_hint": "france"}])
