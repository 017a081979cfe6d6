"""moa export: PEFT adapters + router + manifest, and one culture merged into the base, equal the MoA model."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import fresh_base, randomize_adapters
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moa
from moa.base_model import BaseModelConfig, load_moa
from moa.cli import main

CULTURES = ["japan", "india", "nigeria"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model = moa.MoAForCausalLM.from_base(fresh_base("llama"), moa.MoAConfig(cultures=CULTURES, r=4, alpha=8))
    randomize_adapters(model, std=0.1, seed=2)
    path = tmp_path_factory.mktemp("run") / "run"
    model.save_pretrained(path, base_spec=BaseModelConfig(tiny={"family": "llama"}))
    return path


@pytest.fixture(scope="module")
def moa_model(run_dir):
    return load_moa(run_dir)[0]


@pytest.fixture(scope="module")
def peft_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "peft"
    assert main(["export", "--model", str(run_dir), "--format", "peft", "--output-dir", str(out)]) == 0
    return out


def batch():
    ids = torch.randint(3, 300, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    return ids, mask


def oracle(model, culture, **kw):
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, culture_ids=[culture] * 3, routing="oracle", **kw)


def test_peft_adapters_equal_oracle_forward(moa_model, peft_dir):
    ids, mask = batch()
    for culture in CULTURES:
        peft_model = PeftModel.from_pretrained(fresh_base("llama"), str(peft_dir / culture)).eval()
        with torch.no_grad():
            got = peft_model(input_ids=ids, attention_mask=mask).logits
        assert (got - oracle(moa_model, culture).logits).abs().max() <= 1e-5, culture


def test_manifest_and_router(run_dir, moa_model, peft_dir):
    manifest = json.loads((peft_dir / "manifest.json").read_text())
    assert [c["name"] for c in manifest["cultures"]] == CULTURES
    assert [c["id"] for c in manifest["cultures"]] == [0, 1, 2]
    assert all((peft_dir / c["adapter_dir"] / "adapter_config.json").is_file() for c in manifest["cultures"])
    assert manifest["base_model"] == json.loads((run_dir / "base_model.json").read_text())
    assert manifest["moa_config"] == json.loads((run_dir / "moa_config.json").read_text())
    assert set(manifest["router"]["how_to_apply"]) == {"gate", "token_routing", "sequence_choice"}
    router = load_file(str(peft_dir / "router.safetensors"))
    want = {k: v for k, v in moa_model.adapter_state_dict().items() if k.startswith("routers.")}
    assert sorted(router) == sorted(want) == manifest["router"]["keys"]
    assert all(torch.equal(router[k], want[k]) for k in want)
    assert sorted(p.name for p in peft_dir.iterdir()) == sorted(CULTURES + ["manifest.json", "router.safetensors"])


def test_router_formula_as_described(moa_model, peft_dir):
    """The manifest's gate formula, applied to a PEFT model's hidden states, gives the MoA router logits."""
    router = load_file(str(peft_dir / "router.safetensors"))
    ids, mask = batch()
    culture = "nigeria"
    peft_model = PeftModel.from_pretrained(fresh_base("llama"), str(peft_dir / culture)).eval()
    with torch.no_grad():
        hidden = peft_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    want = oracle(moa_model, culture, labels=ids).router_logits  # labels: the gates run under oracle routing
    m = mask.float()[..., None]
    for layer in range(len(want)):
        taps = router[f"routers.{layer}.taps.weight"]
        window = taps.shape[0] // router[f"routers.{layer}.bias"].shape[0]
        h = F.rms_norm(hidden[0].float(), hidden[0].shape[-1:]) * m  # every gate reads the first layer's input
        f = router[f"routers.{layer}.bias"] + sum(
            F.pad(h, (0, 0, j, 0))[:, :h.shape[1]] @ taps.view(window, -1, h.shape[-1])[j].t() for j in range(window))
        f = torch.tanh(f)
        score = 10 * torch.tanh(f.shape[-1] ** 0.5 * (f @ router[f"routers.{layer}.score.weight"].t()) / 10)
        w = torch.exp(score - 10) * m
        pooled = (f * w).cumsum(1) / w.cumsum(1)
        logits = F.rms_norm(pooled, pooled.shape[-1:]) @ router[f"routers.{layer}.gate.weight"].t() \
            + router[f"routers.{layer}.gate.bias"]
        torch.testing.assert_close(logits[mask.bool()], want[layer][mask.bool()], atol=1e-5, rtol=1e-5)


def test_merged_equals_oracle_forward(run_dir, moa_model, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", "--model", str(run_dir), "--format", "merged", "--culture", "india", "--output-dir", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = batch()
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask).logits
        base = fresh_base("llama")(input_ids=ids, attention_mask=mask).logits
    want = oracle(moa_model, "india").logits
    assert (got - want).abs().max() <= 1e-4
    assert (base - want).abs().max() > 1e-2  # the adapter really is folded in
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    # a second export replaces the first and leaves no temporary directory
    assert main(["export", "--model", str(run_dir), "--format", "merged", "--culture", "japan", "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_bad_input(run_dir, tmp_path, capsys):
    def fails(*argv, model=run_dir):
        out = tmp_path / "out"
        assert main(["export", "--model", str(model), "--output-dir", str(out), *argv]) == 2
        assert not out.exists()
        return capsys.readouterr().err

    err = fails("--format", "merged", "--culture", "france")
    assert "unknown culture 'france': expected one of ['japan', 'india', 'nigeria']" in err
    assert "--format merged needs --culture" in fails("--format", "merged")
    assert "applies to --format merged only" in fails("--format", "peft", "--culture", "japan")
    assert "is not a saved MoA run" in fails("--format", "peft", model=tmp_path)
    quantized = tmp_path / "quantized"
    shutil.copytree(run_dir, quantized)
    spec = json.loads((quantized / "base_model.json").read_text())
    (quantized / "base_model.json").write_text(json.dumps({**spec, "quantization": "nf4"}))
    assert "needs an unquantized base" in fails("--format", "merged", "--culture", "japan", model=quantized)
