"""Training config, schedule and batch sampling: validated before compute, deterministic per step."""
import json

import numpy as np
import pytest
import yaml

from moa.training.config import TrainConfig
from moa.training.data import StageData, micro_batches
from moa.training.schedule import learning_rate, warmup_decay
from moa.training.trainer import deepspeed_config
from moa.tiny import byte_tokenizer
from train_helpers import ROOT, TINY, metrics, moa_train, tiny_config


def test_tiny_config_loads_with_paths_resolved():
    config = TrainConfig.from_file(TINY)
    assert config.total_steps == 20 and [s.name for s in config.stages] == ["broad", "task"]
    assert all(p.startswith(str(ROOT / "data" / "tiny")) for s in config.stages for p in s.train)


@pytest.mark.parametrize("changes, message", [
    ({"learning_rate": 1}, "unknown key 'learning_rate'"),
    ({"batch": {"micro_size": 2}}, "unknown key 'batch.micro_size' (did you mean 'batch.micro_batch_size'?)"),
    ({"moa": {"rank": 4}}, "unknown key 'moa.rank' (did you mean 'moa.r'?); known keys of moa: ['alpha', 'cultures',"),
    ({"stages": {0: {"epochs": 1}}}, "unknown key 'stages.0.epochs'"),
    ({"stages": {1: {"lr": -1}}}, "stages.1.lr must be positive, got -1.0"),
    ({"optim": {"weight_decay": "abc"}}, "optim.weight_decay: expected float, got 'abc'"),
    ({"stages": {0: {"steps": 2.5}}}, "stages.0.steps: expected int, got 2.5"),
    ({"precision": "fp8"}, "precision: expected one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
    ({"model": {"quantization": "nf3"}}, "model.quantization must be one of"),
    ({"batch": {"sampling": "balanced"}}, "batch.sampling: expected one of 'uniform', 'proportional', got 'balanced'"),
])
def test_bad_config_names_the_key(tmp_path, changes, message):
    with pytest.raises(ValueError) as err:
        TrainConfig.from_file(tiny_config(tmp_path, **changes))
    assert message in str(err.value)


@pytest.mark.slow  # a `moa train` subprocess
def test_bad_data_line_fails_before_compute_with_file_and_line(tmp_path):
    rows = (ROOT / "data" / "tiny" / "stage1_train.jsonl").read_text().splitlines()
    bad = json.loads(rows[2])
    bad["culture"] = "atlantis"
    rows[2] = json.dumps(bad)
    rows[4] = "{not json"
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    config = tiny_config(tmp_path, stages={0: {"train": str(data)}})
    result = moa_train(config, "--output-dir", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert f"{data}:3:" in result.stderr and "atlantis" in result.stderr and f"{data}:5:" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was trained or written


@pytest.mark.slow  # a `moa train` subprocess
def test_missing_data_file_and_deepspeed_conflict(tmp_path):
    result = moa_train(tiny_config(tmp_path, stages={1: {"validation": "nowhere.jsonl"}}), check=False)
    assert result.returncode == 2 and "nowhere.jsonl" in result.stderr
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 3}))
    config = TrainConfig.from_file(tiny_config(tmp_path, deepspeed=str(ds)))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu is 3 but the training config gives 2"):
        deepspeed_config(config, world=1)
    with pytest.raises(ValueError, match="global_batch_size 8 is not a multiple of micro_batch_size 2 x world size 3"):
        deepspeed_config(TrainConfig.from_file(TINY), world=3)


def test_deepspeed_auto_values_are_filled():
    config = TrainConfig.from_file(TINY)
    config.deepspeed = str(ROOT / "configs" / "deepspeed" / "zero3.json")
    ds = deepspeed_config(config, world=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8 and ds["optimizer"]["params"]["lr"] == config.stages[0].lr
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 3


def test_schedule_warmup_then_cosine_per_stage():
    config = TrainConfig.from_file(TINY)  # broad: 4 steps, lr 3e-3, warmup 1; task: 16 steps, lr 2e-3, warmup 2
    lrs = [learning_rate(config, s) for s in range(config.total_steps)]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)
    assert lrs[3] == pytest.approx(3e-4)  # end of stage 1: min_lr_ratio 0.1
    assert lrs[4] == pytest.approx(2e-3 / 3) and lrs[6] == pytest.approx(2e-3)
    assert lrs[-1] == pytest.approx(2e-4)
    assert all(a >= b for a, b in zip(lrs[6:], lrs[7:]))
    # the warmup step climbs to the peak, then the linear decay reaches min_lr_ratio at the last step
    assert [warmup_decay(1.0, s, 5, 1, 0.2, "linear") for s in range(5)] == pytest.approx([0.5, 1.0, 1 - 0.8 / 3, 1 - 1.6 / 3, 0.2])
    assert [warmup_decay(1.0, s, 4, 0, 0.2, "constant") for s in range(4)] == [1.0] * 4
    with pytest.raises(ValueError, match="schedule must be cosine, linear or constant, got 'step'"):
        warmup_decay(1.0, 2, 4, 0, 0.2, "step")


def test_global_batches_are_a_function_of_the_step_and_split_across_processes():
    config = TrainConfig.from_file(TINY)
    data = StageData(config.stages[1].train, byte_tokenizer(), config.moa.cultures, 64)
    a = data.global_batch(0, 1, 5, 8, "uniform")
    assert np.array_equal(a, data.global_batch(0, 1, 5, 8, "uniform"))
    assert not np.array_equal(a, data.global_batch(0, 1, 6, 8, "uniform"))
    one = micro_batches(a, 2, 0, 1)
    two = micro_batches(a, 2, 0, 2) + micro_batches(a, 2, 1, 2)
    assert sorted(map(tuple, one)) == sorted(map(tuple, two)) and len(one) == 4
    big = np.concatenate([data.global_batch(0, 1, s, 64, "uniform") for s in range(20)])
    counts = np.bincount(data.culture_ids[big], minlength=3) / len(big)
    assert np.all(np.abs(counts - 1 / 3) < 0.05)  # uniform over cultures
    batch = data.collate(a[:3], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape and batch["culture_ids"].shape == (3,)
    assert ((batch["labels"] != -100) <= batch["attention_mask"].bool()).all()


@pytest.mark.slow  # a `moa train` subprocess
def test_qlora_nf4_run_trains_and_exports(tmp_path):
    config = tiny_config(tmp_path, model={"quantization": "nf4"}, stages={0: {"steps": 2}, 1: {"steps": 8, "lr": 1e-2}},
                         save_interval=100)
    moa_train(config, "--output-dir", tmp_path / "out")
    rows = metrics(tmp_path / "out")
    first, last = np.mean([r["lm_loss"] for r in rows[:3]]), np.mean([r["lm_loss"] for r in rows[-3:]])
    assert last < first - 0.1, (first, last)
    from moa.base_model import load_moa
    from moa.bnb import MoALinear4bit

    model, tokenizer = load_moa(tmp_path / "out" / "final")
    assert all(isinstance(layer, MoALinear4bit) for layer in model.lora_layers.values())
    assert max(float(layer.lora_B.abs().max()) for layer in model.lora_layers.values()) > 0
    spec = yaml.safe_load((tmp_path / "out" / "final" / "base_model.json").read_text())
    assert spec["quantization"] == "nf4"


@pytest.mark.parametrize("name, world, accumulation, stage", [("llama3-8b-qlora-zero2.yaml", 8, 4, 2),
                                                                ("llama3-70b-zero3.yaml", 8, 8, 3)])
def test_cluster_configs_parse(name, world, accumulation, stage):
    config = TrainConfig.from_file(ROOT / "configs" / "train" / name)
    ds = deepspeed_config(config, world=world)
    assert ds["gradient_accumulation_steps"] == accumulation and ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is True and config.model.dtype == "bfloat16"
    assert config.moa.num_cultures == 10 and [s.name for s in config.stages] == ["broad", "task"]
    from moa.base_model import load_base_model

    with pytest.raises(ValueError, match="is not a local directory"):  # weights are never downloaded
        load_base_model(config.model)
