"""moa generate: mixed-culture batches equal rows run alone, oracle cultures differ, bad input named by line."""
import json

import pytest
from helpers import TEXT_TINY, save_text_run

from moa.base_model import load_moa
from moa.cli import main
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
    assert all(0 < r["router_confidence"] <= 1 and r["routed_culture"] in CULTURES for r in mixed)
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
