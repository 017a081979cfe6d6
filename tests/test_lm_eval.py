"""lm-evaluation-harness against `moa serve`: its own command line, tasks built from a test split (local JSONL).

A multiple-choice task (each label task row's labels, scored as `moa eval` scores them: the label and
EOS after the formatted prompt) runs through `local-completions` with the server's remote tokenizer
and with the run's own tokenizer files, at batch size 4; its per-row choices equal `moa eval`'s for the
same rows, run and culture. A generate_until task runs through `local-completions` and through
`local-chat-completions`; its generations equal `moa generate`'s cut at the stop string. The server
requires an API key, as a shared deployment would.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_text_run
from serve_helpers import Server

from moa.base_model import load_moa
from moa.data import format_prompt, load_jsonl
from moa.eval.scoring import predict_labels, row_labels
from moa.infer import generate_rows

pytestmark = pytest.mark.slow  # a server and lm-eval processes

CULTURES = ["japan", "india", "nigeria"]
CULTURE = "japan"
KEY = "sk-lm-eval"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    run_dir = save_text_run(tmp / "run", CULTURES)
    model, tokenizer = load_moa(run_dir)
    rows = [r for r in load_jsonl(Path(__file__).parents[1] / "data/tiny/stage2_test.jsonl") if r["culture"] == CULTURE]
    label_rows = [r for task in ("mcq", "yesno", "offensive") for r in [r for r in rows if r["task"] == task][:2]]
    open_rows = [r for r in rows if r["task"] == "open"][:4]
    tasks = tmp / "tasks"
    tasks.mkdir()
    eos = tokenizer.eos_token
    write = lambda name, docs: (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))  # noqa: E731
    write("mcq", [{"text": format_prompt(tokenizer, r["prompt"]), "choices": [label + eos for label in row_labels(r)],
                   "gold": row_labels(r).index(r["label"])} for r in label_rows])
    write("gen", [{"text": format_prompt(tokenizer, r["prompt"]), "prompt": r["prompt"], "target": r["response"]}
                  for r in open_rows])
    common = "dataset_path: json\ntest_split: test\n"
    (tasks / "moa_mcq.yaml").write_text(
        f"task: moa_mcq\n{common}dataset_kwargs:\n  data_files:\n    test: {tasks / 'mcq.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: text\ndoc_to_choice: choices\ndoc_to_target: gold\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    for name, text in (("moa_gen", "text"), ("moa_gen_chat", "prompt")):
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {tasks / 'gen.jsonl'}\n"
            f"output_type: generate_until\ndoc_to_text: {text}\ndoc_to_target: target\ntarget_delimiter: ''\n"
            "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n")
    server = Server(tmp, "--model", run_dir, "--api-key", KEY, api_key=KEY)
    yield {"tmp": tmp, "run_dir": run_dir, "model": model, "tokenizer": tokenizer, "label_rows": label_rows,
           "open_rows": open_rows, "tasks": tasks, "server": server}
    server.close()


def lm_eval(setup, model: str, model_args: str, tasks: str, out: str, *extra) -> dict[str, list[dict]]:
    """Run `lm-eval run` against the server; the logged samples of each task, in document order."""
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(setup["tmp"] / "hf")}
    output = setup["tmp"] / out
    done = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
                           "--tasks", tasks, "--include_path", str(setup["tasks"]), "--output_path", str(output),
                           "--log_samples", *extra], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = {}
    for task in tasks.split(","):
        (path,) = Path(output).rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return samples


def completions_args(setup, **extra) -> str:
    args = {"base_url": setup["server"].url + "/v1/completions", "model": CULTURE, "num_concurrent": 2, "max_retries": 1,
            **extra}
    return ",".join(f"{k}={v}" for k, v in args.items())


def expected_choices(setup) -> list[int]:
    rows = setup["label_rows"]
    predictions, _ = predict_labels(setup["model"], setup["tokenizer"], rows, [CULTURES.index(CULTURE)] * len(rows),
                                    "oracle", batch_size=8, max_length=512)
    return [row_labels(r).index(p) for r, p in zip(rows, predictions)]


def expected_generations(setup) -> list[str]:
    rows = [{"prompt": r["prompt"], "culture": CULTURE} for r in setup["open_rows"]]
    return [r["text"].split("\n")[0] for r in generate_rows(setup["model"], setup["tokenizer"], rows, routing="oracle",
                                                              max_new_tokens=8)]


def choices(samples: list[dict]) -> list[int]:
    return [int(torch.tensor([float(lp) for lp, _ in s["filtered_resps"]]).argmax()) for s in samples]


@pytest.mark.parametrize("tokenizer", ["remote", "run files"])
def test_local_completions_multiple_choice_and_generation(setup, tokenizer):
    backend = ({"tokenizer_backend": "remote", "auth_token": KEY} if tokenizer == "remote" else
               {"tokenizer_backend": "huggingface", "tokenizer": setup["run_dir"]})
    samples = lm_eval(setup, "local-completions", completions_args(setup, **backend), "moa_mcq,moa_gen",
                      f"out-{tokenizer.replace(' ', '-')}", "--batch_size", "4")
    assert len(samples["moa_mcq"]) == len(setup["label_rows"])
    assert choices(samples["moa_mcq"]) == expected_choices(setup)
    assert [s["filtered_resps"][0] for s in samples["moa_gen"]] == expected_generations(setup)


def test_local_chat_completions_generation(setup):
    args = (f"base_url={setup['server'].url}/v1/chat/completions,model={CULTURE},num_concurrent=2,max_retries=1")
    samples = lm_eval(setup, "local-chat-completions", args, "moa_gen_chat", "out-chat", "--apply_chat_template")
    assert [s["filtered_resps"][0] for s in samples["moa_gen_chat"]] == expected_generations(setup)
