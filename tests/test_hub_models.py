"""Base models by Hugging Face Hub id, offline: a cache laid out as huggingface_hub lays out a download
(models--org--name/blobs/<sha256>, snapshots/<commit>/<file> linking to the blobs, refs/<branch> holding
the commit), read by `moa train` and by moa.base_model in subprocesses with HF_HUB_OFFLINE=1 and HF_HOME or
HF_HUB_CACHE pointing at it (huggingface_hub reads them when it is imported)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from train_helpers import ROOT, run_env, tiny_config

from moa.tiny import byte_tokenizer, tiny_model

REPO = "moa-test/tiny-llama"


def lay_out(cache: Path, repo_id: str, model_dir: Path, branches: list[str]) -> str:
    """Store the files of `model_dir` in `cache` as one commit of `repo_id`, named by `branches`; returns the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    for file in files:
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(file.read_bytes())
        link = repo / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for branch in branches:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(HF_HOME, commit of 'v1', commit of 'main'): two tiny Llamas (seeds 1 and 2) with the byte tokenizer."""
    root = tmp_path_factory.mktemp("hub")
    commits = []
    for seed, branches in ((1, ["v1"]), (2, ["main"])):
        model_dir = root / f"model{seed}"
        tiny_model("llama", seed=seed, hidden_size=64, intermediate_size=128, num_hidden_layers=2).save_pretrained(model_dir)
        byte_tokenizer().save_pretrained(model_dir)
        commits.append(lay_out(root / "hf" / "hub", REPO, model_dir, branches))
    return root / "hf", *commits


def offline_env(**hf) -> dict:
    env = run_env()
    for key in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(key, None)
    return {**env, "HF_HUB_OFFLINE": "1", **{k: str(v) for k, v in hf.items()}}


def moa(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moa", *map(str, args), "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def hub_config(tmp_path: Path, model: dict) -> Path:
    path = tiny_config(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["model"] = model
    path.write_text(yaml.safe_dump(config))
    return path


def test_cache_has_the_hub_client_layout(hub):
    home, v1, main = hub
    (repo,) = scan_cache_dir(home / "hub").repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {v1: {"v1"}, main: {"main"}}
    found = try_to_load_from_cache(REPO, "model.safetensors", cache_dir=home / "hub")
    assert Path(found).parent.name == main and Path(found).resolve().parent.name == "blobs"


CHECKS = """
import json, sys, torch
from moa.base_model import load_base_model, load_moa, pin_revision
from moa.config import BaseModelConfig
from moa.errors import UsageError
from moa.export import export_vllm

def weight(spec):
    model, tokenizer = load_base_model(spec)
    return model.get_input_embeddings().weight, tokenizer

main, main_tok = weight(BaseModelConfig(path=sys.argv[1]))
by_branch, _ = weight(BaseModelConfig(path=sys.argv[1], revision="v1"))
by_commit, _ = weight(BaseModelConfig(path=sys.argv[1], revision=sys.argv[2]))
first_main, _ = weight(BaseModelConfig(path=sys.argv[1], revision=sys.argv[3]))
trained, tokenizer = load_moa(sys.argv[4])
errors = []
for spec in (BaseModelConfig(path="moa-test/missing"), BaseModelConfig(path=sys.argv[1], revision="nope"),
             BaseModelConfig(path=sys.argv[1], tokenizer="moa-test/missing-tokenizer")):
    try:
        load_base_model(spec)
    except UsageError as err:
        errors.append(str(err))
print(json.dumps({"pinned": pin_revision(BaseModelConfig(path=sys.argv[1])).revision,
                  "main_is_v1": torch.equal(main, by_branch), "branch_is_commit": torch.equal(by_branch, by_commit),
                  "trained_is_first_main": torch.equal(trained.base_model.get_input_embeddings().weight, first_main),
                  "trained_is_v1": torch.equal(trained.base_model.get_input_embeddings().weight, by_branch),
                  "tokenizer": [main_tok("hi").input_ids, tokenizer("hi").input_ids], "errors": errors,
                  "vllm": export_vllm(sys.argv[4], sys.argv[5])}))
"""


@pytest.mark.slow
def test_run_trains_from_a_hub_id_and_reloads_at_its_commit(hub, tmp_path):
    home, v1, main = hub
    out = tmp_path / "out"
    result = moa("train", hub_config(tmp_path, {"path": REPO}), "--output-dir", out, "--max-steps", "2",
                 env=offline_env(HF_HOME=home))
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((out / "final" / "base_model.json").read_text())
    assert (recorded["path"], recorded["revision"]) == (REPO, main)  # main, pinned to the commit it named
    assert json.loads((out / "train_config.json").read_text())["model"]["revision"] == main
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 2

    refs_main = home / "hub" / f"models--{REPO.replace('/', '--')}" / "refs" / "main"
    refs_main.write_text(v1)  # main moves on: the trained run still reloads the weights it trained on
    result = subprocess.run([sys.executable, "-c", CHECKS, REPO, v1, main, out / "final", tmp_path / "vllm"], cwd=ROOT,
                            capture_output=True, text=True, env=offline_env(HF_HUB_CACHE=home / "hub"))
    refs_main.write_text(main)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["pinned"] == v1 and found["main_is_v1"] and found["branch_is_commit"]
    assert found["trained_is_first_main"] and not found["trained_is_v1"]
    assert found["tokenizer"][0] == found["tokenizer"][1]
    assert found["vllm"].startswith(f"vllm serve {REPO} --served-model-name base --dtype float32 --revision {main} ")
    assert "--tokenizer" not in found["vllm"]  # vLLM reads the tokenizer from the model, at its revision
    missing, bad_revision, bad_tokenizer = found["errors"]
    assert missing.startswith("model.path 'moa-test/missing' is not a local directory, and the Hugging Face cache "
                              f"{home / 'hub'} does not hold it (HF_HUB_OFFLINE=1")
    assert "hf download moa-test/missing" in missing and "HF_HOME" in missing
    assert bad_revision.startswith(f"model.path {REPO!r} at revision 'nope' is not a local directory")
    assert bad_tokenizer.startswith("model.tokenizer 'moa-test/missing-tokenizer' is not a local directory")


def test_missing_hub_id_is_one_error_line(hub, tmp_path):
    home, _, _ = hub
    result = moa("train", hub_config(tmp_path, {"path": "moa-test/not-there", "revision": "v2"}), "--output-dir",
                 tmp_path / "out", env=offline_env(HF_HOME=home))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: model.path 'moa-test/not-there' at revision 'v2' is not a local directory")
    assert "--revision v2" in result.stderr and "Traceback" not in result.stderr
