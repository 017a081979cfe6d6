"""Config files as users write them: YAML 1.2 numbers, typed fields, dotted overrides on the command line."""
import json

import pytest

from moa.config_loader import load_yaml
from moa.demo import DEFAULT_CONFIG, load_demo_config
from moa.errors import UsageError
from moa.synth.tasks import load_task
from moa.training.config import TrainConfig
from train_helpers import ROOT, TINY, moa_train, tiny_config


def test_yaml_12_numbers(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text("a: 1e-4\nb: -2E+3\nc: 1.\nd: .5\ne: 10\nf: 0x1f\ng: '1e-4'\nh: 1_000\n")
    assert load_yaml(path) == {"a": 1e-4, "b": -2000.0, "c": 1.0, "d": 0.5, "e": 10, "f": 31, "g": "1e-4", "h": "1_000"}


def test_numbers_as_every_config_in_the_field_writes_them(tmp_path):
    path = tiny_config(tmp_path)
    text = path.read_text().replace("lr: 0.003", "lr: 3e-3").replace("weight_decay: 0.0", "weight_decay: 1e-2")
    path.write_text(text.replace("min_lr_ratio: 0.1", "min_lr_ratio: 1e-1\n  eps: 1e-6"))
    config = TrainConfig.from_file(path)
    assert config.stages[0].lr == 3e-3 and config.optim.weight_decay == 1e-2 and config.optim.eps == 1e-6
    assert config.optim.min_lr_ratio == 0.1 and config.moa.alpha == 8.0 and isinstance(config.moa.alpha, float)


def test_a_bad_value_is_one_error_naming_file_key_and_type(tmp_path):
    path = tiny_config(tmp_path, optim={"weight_decay": "abc"})
    with pytest.raises(UsageError) as err:
        TrainConfig.from_file(path)
    assert str(err.value) == f"{path}: optim.weight_decay: expected float, got 'abc'"


def test_an_override_equals_the_same_key_in_the_file(tmp_path):
    changed = tiny_config(tmp_path, "changed.yaml", optim={"weight_decay": 0.01}, stages={0: {"steps": 3}}, moa={"r": 8},
                          model={"tiny": {"family": "qwen2", "hidden_size": 32}})
    base = tiny_config(tmp_path)
    overridden = TrainConfig.from_file(base, ["optim.weight_decay=1e-2", "stages.0.steps=3", "moa.r=8",
                                              "model.tiny={family: qwen2, hidden_size: 32}"])
    assert overridden == TrainConfig.from_file(changed)
    assert TrainConfig.from_file(base, ["output_dir=elsewhere"]).output_dir == "elsewhere"


@pytest.mark.parametrize("override, message", [
    ("optim.lr=2e-4", "override 'optim.lr': unknown key 'optim.lr' (did you mean 'stages.0.lr'?)"),
    ("moa.rank=8", "unknown key 'moa.rank' (did you mean 'moa.r'?)"),
    ("batch.micro_batch=4", "(did you mean 'batch.micro_batch_size'?)"),
    ("stages.2.steps=5", "stages has 2 entries, so index 2 is out of range"),
    ("stages.first.steps=5", "stages is a list: expected an index (e.g. stages.0), got 'first'"),
    ("seed.value=1", "seed is int, which has no key 'value'"),
    ("moa.r=eight", "moa.r: expected int, got 'eight'"),
    ("optim.betas=[0.9, x]", "optim.betas.1: expected float, got 'x'"),
    ("optim.weight_decay", "expected key=value"),
])
def test_bad_overrides_are_refused(override, message):
    with pytest.raises(UsageError) as err:
        TrainConfig.from_file(TINY, [override])
    assert message in str(err.value)


def test_demo_and_task_configs_read_the_same_way(tmp_path):
    config = load_demo_config(DEFAULT_CONFIG, quick=True, overrides=["pretrain.lr=1e-3", "train.stages.1.steps=7"])
    assert config.pretrain.lr == 1e-3 and config.train.stages[1]["steps"] == 7 and config.pretrain.steps == 40
    with pytest.raises(UsageError, match="unknown key 'pretrain.step' \\(did you mean 'pretrain.steps'\\?\\)"):
        load_demo_config(DEFAULT_CONFIG, overrides=["pretrain.step=3"])
    spec = tmp_path / "mcq.yaml"
    spec.write_text((ROOT / "configs" / "tasks" / "mcq.yaml").read_text().replace("max_prompt_bytes:", "max_prompt_bytes: x #"))
    with pytest.raises(UsageError, match=f"{spec}: max_prompt_bytes: expected int, got 'x'"):
        load_task(spec)


@pytest.mark.slow  # a `moa train` subprocess
def test_lr_1e4_trains_and_overrides_land_in_train_config(tmp_path):
    path = tiny_config(tmp_path, batch={"global_batch_size": 4})
    path.write_text(path.read_text() + "# written by hand\n")
    text = path.read_text().replace("lr: 0.003", "lr: 1e-4").replace("weight_decay: 0.0", "weight_decay: 1e-2")
    assert "lr: 1e-4" in text and "weight_decay: 1e-2" in text
    path.write_text(text)
    out = tmp_path / "out"
    moa_train(path, "optim.eps=1e-6", "stages.1.steps=3", "--output-dir", out, "--max-steps", 2)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["stages"][0]["lr"] == 1e-4 and saved["optim"]["weight_decay"] == 1e-2 and saved["optim"]["eps"] == 1e-6
    assert saved["stages"][1]["steps"] == 3
    assert (out / "final" / "moa_adapters.safetensors").is_file()
    result = moa_train(path, "optim.lr=2e-4", "--output-dir", tmp_path / "bad", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == \
        "error: override 'optim.lr': unknown key 'optim.lr' (did you mean 'stages.0.lr'?)"
