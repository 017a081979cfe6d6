"""One process vs DeepSpeed ZeRO-2 / ZeRO-3 on 2 gloo processes: same losses, same exported adapters.

Runs the commands as a user types them: `moa train configs/train/tiny-cpu.yaml ...` and
`torchrun --nproc_per_node 2 -m moa.training ... --deepspeed configs/deepspeed/zeroN.json`.
"""
import json

import pytest
from safetensors.torch import load_file

from moa.base_model import load_moa
from train_helpers import ROOT, TINY, metrics, moa_train, tiny_config, torchrun_train

pytestmark = pytest.mark.slow  # `moa train` and torchrun subprocesses
STEPS = 6
LOSS_TOL = 1e-5  # fp32; gradients are summed across processes in a different order
WEIGHT_TOL = 1e-5


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    moa_train(TINY, "--output-dir", out, "--max-steps", STEPS)
    return out


def test_single_process_run_writes_final_and_metrics(single_run):
    final = single_run / "final"
    for name in ("moa_adapters.safetensors", "moa_config.json", "base_model.json"):
        assert (final / name).is_file()
    assert (single_run / "metrics.jsonl").is_file() and (single_run / "metrics.png").stat().st_size > 0
    rows = metrics(single_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["stage"] for r in rows] == ["broad"] * 4 + ["task"] * 2  # two stages in one run
    for r in rows:
        assert r["lm_loss_per_culture"] and set(r["lm_loss_per_culture"]) <= {"japan", "nigeria", "united_states"}
        assert r["tokens_per_s"] > 0 and 0 <= r["routing_accuracy"] <= 1
    assert json.loads((final / "moa_config.json").read_text())["cultures"] == ["japan", "nigeria", "united_states"]
    model, tokenizer = load_moa(final)  # the export loads back as a whole model
    assert len(model.lora_layers) == 14


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_two_processes_match_single(single_run, tmp_path, zero):
    out = tmp_path / "out"
    torchrun_train(2, TINY, "--deepspeed", ROOT / "configs" / "deepspeed" / f"{zero}.json", "--output-dir", out,
                   "--max-steps", STEPS)
    ref, got = metrics(single_run), metrics(out)
    assert len(got) == len(ref) == STEPS
    for a, b in zip(ref, got):
        for key in ("loss", "lm_loss", "router_loss", "routing_accuracy"):
            assert b[key] == pytest.approx(a[key], abs=LOSS_TOL), (zero, a["step"], key)
        assert b["tokens"] == a["tokens"]  # the same rows were trained on
    ref_eval, got_eval = metrics(single_run, "eval"), metrics(out, "eval")
    assert [r["lm_loss"] for r in got_eval] == pytest.approx([r["lm_loss"] for r in ref_eval], abs=LOSS_TOL)
    a = load_file(single_run / "final" / "moa_adapters.safetensors")
    b = load_file(out / "final" / "moa_adapters.safetensors")
    assert set(a) == set(b)
    for key in a:
        assert b[key].shape == a[key].shape and b[key].numel() > 0  # gathered, not empty ZeRO-3 shards
        assert (a[key] - b[key]).abs().max() <= WEIGHT_TOL, key
    trained = [k for k in a if k.endswith("lora_B")]
    assert all(a[k].abs().max() > 0 for k in trained)  # the adapters moved from their zero init


def test_qlora_nf4_under_zero3_matches_single(tmp_path):
    """4-bit base stored in the compute dtype (bnb_4bit_quant_storage), so ZeRO-3 shards it like any tensor."""
    config = tiny_config(tmp_path, model={"quantization": "nf4"})
    moa_train(config, "--output-dir", tmp_path / "one", "--max-steps", 4)
    torchrun_train(2, config, "--deepspeed", ROOT / "configs" / "deepspeed" / "zero3.json", "--output-dir", tmp_path / "two",
                   "--max-steps", 4)
    ref, got = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["lm_loss"] for r in got] == pytest.approx([r["lm_loss"] for r in ref], abs=LOSS_TOL)
    a = load_file(tmp_path / "one" / "final" / "moa_adapters.safetensors")
    b = load_file(tmp_path / "two" / "final" / "moa_adapters.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= WEIGHT_TOL
