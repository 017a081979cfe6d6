"""The row schema: loading, validation errors with file and line, filters, tokenization with loss masks."""
import json

import pytest

from moa.data import CULTURES, LABELS, TASKS, DataError, encode_example, format_prompt, load_jsonl
from moa.tiny import byte_tokenizer

GOOD = [
    {"culture": "japan", "task": "mcq", "prompt": "Q?\nA) x\nB) y\nAnswer with one letter.", "response": "B", "label": "B"},
    {"culture": "germany", "task": "yesno", "prompt": "Lukas is on time. Appropriate?", "response": "yes"},
    {"culture": "india", "task": "open", "prompt": "How do people greet?", "response": "With namaste.",
     "split": "test", "stage": 2, "norm": "business_greeting", "cue": False,
     "provenance": {"query": "q", "doc_ids": ["india-greetings-1"]}},
]


def write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return path


def test_vocabularies():
    assert len(CULTURES) == 10 and {"japan", "south_korea", "united_states"} <= set(CULTURES)
    assert all(c == c.lower() and " " not in c for c in CULTURES)
    assert TASKS == ["mcq", "yesno", "offensive", "open"]
    assert set(LABELS) == {"mcq", "yesno", "offensive"}


def test_load_valid_rows_and_filters(tmp_path):
    path = write(tmp_path / "good.jsonl", GOOD + [""])
    assert load_jsonl(path) == GOOD
    assert [r["culture"] for r in load_jsonl(path, cultures=["japan", "india"])] == ["japan", "india"]
    assert [r["task"] for r in load_jsonl(path, tasks=["open"])] == ["open"]


def test_every_bad_line_is_reported_with_file_and_line(tmp_path):
    lines = [
        GOOD[0],                                                                      # 1 ok
        "{not json",                                                                  # 2
        {**GOOD[0], "culture": "atlantis"},                                           # 3
        {**GOOD[0], "task": "poetry"},                                                # 4
        {"culture": "japan", "task": "open", "prompt": "Q?"},                         # 5 no response
        {**GOOD[1], "response": "maybe"},                                             # 6 not a label
        {**GOOD[0], "label": "C"},                                                    # 7 label != response
        {**GOOD[2], "colour": "red"},                                                 # 8 unknown field
        {**GOOD[2], "split": "dev"},                                                  # 9 bad split
        GOOD[1],                                                                      # 10 ok
    ]
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    err = info.value
    assert str(err).startswith(f"8 bad line(s) in {path}:\n  {path}:2: not valid JSON")
    assert sorted({line for _, line, _ in err.problems}) == [2, 3, 4, 5, 6, 7, 8, 9]
    message = str(err)
    for line, needle in [(2, "not valid JSON"), (3, "'atlantis'"), (4, "'poetry'"), (5, "'response'"),
                         (6, "'maybe'"), (7, "label 'C'"), (8, "'colour'"), (9, "'dev'")]:
        assert f"{path}:{line}: " in message and needle in message
    assert "expected one of" in message


def test_unknown_culture_accepted_when_listed(tmp_path):
    path = write(tmp_path / "extra.jsonl", [{**GOOD[1], "culture": "france"}, GOOD[1]])
    with pytest.raises(DataError, match="'france'"):
        load_jsonl(path)
    assert [r["culture"] for r in load_jsonl(path, cultures=["france"])] == ["france"]


def test_serve_model_ids_are_refused_as_row_cultures_even_when_listed(tmp_path):
    path = write(tmp_path / "reserved.jsonl", [{**GOOD[1], "culture": "base"}, {**GOOD[1], "culture": "auto"}])
    with pytest.raises(DataError) as info:
        load_jsonl(path, cultures=["base", "auto"])
    assert [message for _, _, message in info.value.problems] == [
        f"culture name {name!r} is reserved: 'auto' (the router's pick) and 'base' (the base model, no adapter) are "
        f"model ids of `moa serve` and 'base' is the base model's name in the vLLM export; rename the culture"
        for name in ("base", "auto")]


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_encode_plain_format_masks_the_prompt():
    tok = byte_tokenizer()
    row = {"prompt": "Bow or shake hands?", "response": "Bow"}
    enc = encode_example(tok, row, max_length=256)
    prompt_len = enc["labels"].count(-100)
    assert tok.decode(enc["input_ids"][:prompt_len]) == "User: Bow or shake hands?\nAssistant: "
    assert enc["labels"][prompt_len:] == tok("Bow", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["labels"][prompt_len:] == enc["input_ids"][prompt_len:]
    assert len(enc["input_ids"]) == len(enc["labels"])


def test_encode_with_chat_template():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    row = {"prompt": "Tip?", "response": "No"}
    enc = encode_example(tok, row, max_length=256)
    assert format_prompt(tok, "Tip?") == "<user>Tip?</s><assistant>"
    prompt_len = enc["labels"].count(-100)
    assert tok.decode(enc["input_ids"][:prompt_len]) == "<user>Tip?</s><assistant>"
    # the response part is what the template adds for the assistant turn, ending in its EOS
    assert tok.decode(enc["input_ids"][prompt_len:]) == "No</s>"
    assert enc["input_ids"][-1] == tok.eos_token_id


def test_truncation_keeps_the_response_and_the_end_of_the_prompt():
    tok = byte_tokenizer()
    enc = encode_example(tok, {"prompt": "x" * 200, "response": "yes"}, max_length=32)
    assert len(enc["input_ids"]) == 32
    assert tok.decode(enc["input_ids"][-4:]) == "yes</s>"
    assert enc["labels"][:28] == [-100] * 28
    assert tok.decode(enc["input_ids"][:28]).endswith("x\nAssistant: ")
    long = encode_example(tok, {"prompt": "p" * 100, "response": "r" * 100}, max_length=40)
    assert len(long["input_ids"]) == 40 and sum(l != -100 for l in long["labels"]) == 20
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tok, {"prompt": "a", "response": "b"}, max_length=1)
