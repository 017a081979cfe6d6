"""moa.saved_run: the three files of a saved run, written atomically, read back and checked against each other."""
import json

import pytest
import torch
from helpers import fresh_base, randomize_adapters
from safetensors.torch import load_file, save_file

import moa
from moa import saved_run
from moa.atomic import atomic_file
from moa.base_model import load_moa
from moa.config import BaseModelConfig
from moa.errors import UsageError

CULTURES = ["japan", "india"]
SPEC = BaseModelConfig(tiny={"family": "llama"})


@pytest.fixture(scope="module")
def model():
    model = moa.MoAForCausalLM.from_base(fresh_base("llama"), moa.MoAConfig(cultures=CULTURES, r=4, alpha=8))
    randomize_adapters(model, seed=5)
    return model


@pytest.fixture
def run_dir(model, tmp_path):
    model.save_pretrained(tmp_path / "run", base_spec=SPEC)
    return tmp_path / "run"


def test_files_read_back_equal(model, run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == ["base_model.json", "moa_adapters.safetensors", "moa_config.json"]
    config, spec = saved_run.read(run_dir)
    assert config == model.config and spec == SPEC
    assert json.loads((run_dir / "moa_config.json").read_text())["cultures"] == CULTURES
    weights = saved_run.read_weights(run_dir, config)
    own = model.adapter_state_dict()
    assert sorted(weights) == sorted(own)
    assert all(torch.equal(weights[k], own[k].detach()) for k in own)
    loaded, _ = load_moa(run_dir)
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, culture_ids=[0, 1], routing="oracle").logits
        assert torch.equal(loaded(input_ids=ids, culture_ids=[0, 1], routing="oracle").logits, want)


def test_save_replaces_only_an_earlier_run(model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    model.save_pretrained(empty)
    assert sorted(p.name for p in empty.iterdir()) == ["moa_adapters.safetensors", "moa_config.json"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(UsageError, match=r"notes is not empty \(todo.txt\) and is not an earlier output of this kind "
                                         r"\(no moa_config.json in it\): choose another directory or pass --overwrite"):
        model.save_pretrained(foreign)
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"] and (foreign / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes"]  # no temporary left behind


def test_missing_and_malformed_files_are_named(run_dir):
    (run_dir / "base_model.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"base_model.json not found: .*run is not a saved MoA run"):
        load_moa(run_dir)
    assert saved_run.read_config(run_dir).cultures == CULTURES  # the other files still read
    (run_dir / "moa_config.json").write_text("{cultures: [japan]")
    with pytest.raises(ValueError, match=r"moa_config.json: not valid JSON"):
        saved_run.read_config(run_dir)


def test_weights_are_checked_against_the_config(run_dir):
    config = saved_run.read_config(run_dir)
    weights = load_file(str(run_dir / "moa_adapters.safetensors"))
    key = "model.layers.0.self_attn.q_proj.lora_A"

    def fails(changed, match):
        save_file(changed, str(run_dir / "moa_adapters.safetensors"))
        with pytest.raises(ValueError, match=match):
            saved_run.read_weights(run_dir, config)

    fails({**weights, key: weights[key][:, :2].contiguous()}, r"q_proj.lora_A has shape \[2, 2, 64\], but moa_config.json "
                                                   r"\(2 cultures, r=4\) needs \[2, 4, d_in\]")
    fails({k: v for k, v in weights.items() if k != key}, r"q_proj.lora_B has no lora_A beside it")
    fails({**weights, "lm_head.weight": torch.zeros(2, 2)}, r"unexpected tensor 'lm_head.weight'")
    gate = "routers.1.gate.weight"
    fails({**weights, gate: weights[gate][:1].contiguous()}, r"routers.1.gate.weight has shape \[1, 32\].*needs \[2, 32\]")
    # a router saved before the gates read a token window: score over the hidden size, no taps
    fails({**weights, "routers.0.score.weight": torch.zeros(1, 64)},
          r"routers.0.score.weight has shape \[1, 64\], but moa_config.json \(2 cultures, router_window=3, router_dim=32\) "
          r"needs \[1, 32\]")


def test_atomic_file_keeps_the_previous_version_on_failure(tmp_path):
    path = tmp_path / "out.json"
    with atomic_file(path) as f:
        f.write("first")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(path) as f:
            f.write("second, half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
