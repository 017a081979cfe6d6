"""A trained run grows: add a culture (init_from), retrain one with the others frozen, remove one.

After growth every old adapter tensor is bitwise the source run's and old rows' oracle-routed logits are
unchanged (bitwise, CPU); the grown run loads, exports (PEFT, vLLM) and serves; a run killed while it
grows resumes exactly, on one process and under ZeRO-3 on two; removing a culture leaves the router's
other picks as they were.
"""
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ROOT, moa_train, run_env, tiny_config, torchrun_train

from moa import saved_run
from moa.base_model import load_moa
from moa.data import encode_prompt, load_jsonl
from moa.serve.engine import Engine, Request, SamplingParams

pytestmark = pytest.mark.slow  # `moa train` subprocesses
OLD, NEW = ["japan", "nigeria"], "united_states"
GROWN = ["united_states", "japan", "nigeria"]  # any order: slots are matched by name
ZERO3 = ROOT / "configs" / "deepspeed" / "zero3.json"
STEPS = {0: {"steps": 2}, 1: {"steps": 4}}


def old_rows_only(tmp):
    """The tiny data's stages without the new culture's rows: what the source run was trained on."""
    stages = {}
    for index, stage in enumerate(("stage1", "stage2")):
        stages[index] = dict(STEPS[index])
        for split in ("train", "validation"):
            path = tmp / f"{stage}_{split}.jsonl"
            rows = (ROOT / "data" / "tiny" / path.name).read_text().splitlines()
            path.write_text("".join(line + "\n" for line in rows if f'"culture": "{NEW}"' not in line))
            stages[index][split] = str(path)
    return stages


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("source")
    moa_train(tiny_config(tmp, moa={"cultures": OLD}, stages=old_rows_only(tmp)), "--output-dir", tmp / "out")
    return tmp / "out" / "final"


def grow_config(tmp, source, **changes):
    return tiny_config(tmp, name=f"grow-{time.monotonic_ns()}.yaml", moa={"cultures": GROWN}, stages=STEPS,
                       init_from=str(source), save_interval=2, **changes)


@pytest.fixture(scope="module")
def grown(source, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grown")
    moa_train(grow_config(tmp, source), "--output-dir", tmp / "out")
    return tmp / "out" / "final"


def slot(weights, config, key, culture):
    return weights[key][config.cultures.index(culture)]


def assert_old_slots_unchanged(source, grown, old=OLD):
    a, b = load_file(source / saved_run.WEIGHTS_NAME), load_file(grown / saved_run.WEIGHTS_NAME)
    ca, cb = saved_run.read_config(source), saved_run.read_config(grown)
    lora = [k for k in a if ".lora_" in k]
    assert lora and set(a) == set(b)
    for key in lora:
        for culture in old:
            assert torch.equal(slot(a, ca, key, culture), slot(b, cb, key, culture)), (key, culture)
    assert any(not torch.equal(slot(b, cb, k, NEW), torch.zeros_like(slot(b, cb, k, NEW))) for k in lora if "lora_B" in k)


def test_adding_a_culture_keeps_every_old_adapter_and_old_rows_logits(source, grown):
    assert saved_run.read_config(grown).cultures == GROWN
    assert_old_slots_unchanged(source, grown)
    src_model, tokenizer = load_moa(source)
    new_model, _ = load_moa(grown)
    rows = [r for r in load_jsonl(ROOT / "data/tiny/stage2_validation.jsonl") if r["culture"] in OLD][:6]
    for row in rows:
        ids = torch.tensor([encode_prompt(tokenizer, row["prompt"])])
        with torch.no_grad():
            before = src_model(input_ids=ids, culture_ids=[row["culture"]], routing="oracle").logits
            after = new_model(input_ids=ids, culture_ids=[row["culture"]], routing="oracle").logits
        assert torch.equal(before, after), row["id"]


def test_the_grown_run_exports_and_serves(grown, tmp_path):
    for fmt in ("peft", "vllm"):
        done = subprocess.run([sys.executable, "-m", "moa", "export", "--model", str(grown), "--format", fmt,
                               "--output-dir", str(tmp_path / fmt)], capture_output=True, text=True, env=run_env())
        assert done.returncode == 0, done.stderr
        assert (tmp_path / fmt / NEW / "adapter_config.json").is_file()
    model, tokenizer = load_moa(grown)
    engine = Engine(model, tokenizer, max_batch_size=4)
    engine.start()
    events = []
    engine.submit(Request(encode_prompt(tokenizer, "Tipping in Chicago?"), NEW, SamplingParams(max_tokens=4, temperature=0)),
                  events.append)
    assert engine.shutdown(60)
    assert events[0].culture == NEW and events[-1].finish_reason in ("stop", "length")


def test_a_killed_growth_run_resumes_exactly(source, grown, tmp_path):
    config = grow_config(tmp_path, source)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "moa", "train", str(config), "--output-dir", str(out), "--no-progress"],
                            cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_000002").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    moa_train(config, "--output-dir", out, "--resume")
    a, b = load_file(grown / saved_run.WEIGHTS_NAME), load_file(out / "final" / saved_run.WEIGHTS_NAME)
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    assert_old_slots_unchanged(source, out / "final")


def test_growth_under_zero3_on_two_processes_keeps_the_old_adapters(source, tmp_path):
    torchrun_train(2, grow_config(tmp_path, source), "--deepspeed", ZERO3, "--output-dir", tmp_path / "out")
    assert_old_slots_unchanged(source, tmp_path / "out" / "final")


def test_retraining_one_culture_leaves_the_others(source, tmp_path):
    config = tiny_config(tmp_path, moa={"cultures": OLD}, stages=old_rows_only(tmp_path), init_from=str(source),
                         train_cultures=["japan"])
    moa_train(config, "--output-dir", tmp_path / "out")
    a, b = load_file(source / saved_run.WEIGHTS_NAME), load_file(tmp_path / "out" / "final" / saved_run.WEIGHTS_NAME)
    conf = saved_run.read_config(source)
    lora = [k for k in a if ".lora_B" in k]
    assert all(torch.equal(slot(a, conf, k, "nigeria"), slot(b, conf, k, "nigeria")) for k in lora)
    assert not all(torch.equal(slot(a, conf, k, "japan"), slot(b, conf, k, "japan")) for k in lora)


def test_growth_refusals_name_the_setting(source, tmp_path):
    for changes, message in (({"optim": {"weight_decay": 0.01}}, "weight_decay"),
                             ({"model": {"tiny": {"family": "llama", "hidden_size": 32, "intermediate_size": 64,
                                                  "num_hidden_layers": 2}}}, "grows on its own base"),
                             ({"train_cultures": ["mars"]}, "train_cultures")):
        result = moa_train(grow_config(tmp_path, source, **changes), "--output-dir", tmp_path / "refused", check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "refused").exists()


def test_removing_a_culture_keeps_the_other_picks(grown, tmp_path):
    out = tmp_path / "removed"
    done = subprocess.run([sys.executable, "-m", "moa", "cultures", "--model", str(grown), "--remove", "japan",
                           "--output-dir", str(out)], capture_output=True, text=True, env=run_env())
    assert done.returncode == 0, done.stderr
    assert saved_run.read_config(out).cultures == ["united_states", "nigeria"]
    full, tokenizer = load_moa(grown)
    smaller, _ = load_moa(out)
    rows = load_jsonl(ROOT / "data/tiny/stage2_validation.jsonl")
    kept = 0
    for row in rows:
        ids = torch.tensor([encode_prompt(tokenizer, row["prompt"])])
        before, _ = full.route_sequences(ids)
        after, _ = smaller.route_sequences(ids)
        if GROWN[int(before)] != "japan":
            assert smaller.config.cultures[int(after)] == GROWN[int(before)], row["id"]
            kept += 1
    assert kept > 0
    listed = subprocess.run([sys.executable, "-m", "moa", "cultures", "--model", str(out)], capture_output=True, text=True)
    assert listed.stdout.split() == ["united_states", "nigeria"]
