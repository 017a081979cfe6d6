"""moa export --format vllm: every culture as a PEFT LoRA module, the base as a directory, and the exact `vllm serve` command."""
import shlex

import pytest
import torch
from helpers import fresh_base, randomize_adapters
from peft import PeftModel
from transformers import AutoModelForCausalLM

import moa
from moa.base_model import BaseModelConfig, load_moa
from moa.cli import main
from moa.errors import UsageError
from moa.export import _vllm_options, vllm_command

CULTURES = ["japan", "india", "nigeria"]


@pytest.mark.slow  # saves a base, loads it and every adapter with peft
def test_vllm_export_writes_loadable_adapters_and_the_command(tmp_path, capsys):
    model = moa.MoAForCausalLM.from_base(fresh_base("llama"), moa.MoAConfig(cultures=CULTURES, r=4, alpha=8))
    randomize_adapters(model, std=0.1, seed=2)
    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir, base_spec=BaseModelConfig(tiny={"family": "llama"}))
    out = tmp_path / "vllm"
    assert main(["export", "--model", str(run_dir), "--format", "vllm", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]

    script = (out / "vllm_serve.sh").read_text()
    assert script.startswith("#!/bin/sh\n") and f"exec {printed} \"$@\"\n" in script
    assert (out / "vllm_serve.sh").stat().st_mode & 0o111
    words = shlex.split(printed)
    assert words[:5] == ["vllm", "serve", str(out.resolve() / "base"), "--served-model-name", "base"]
    assert words[5] == "--enable-lora" and words[6] == "--lora-modules"
    assert words[7:10] == [f"{c}={out.resolve() / c}" for c in CULTURES]
    assert words[10:] == ["--max-lora-rank", "8", "--max-loras", "3"]  # r=4 rounds up to vLLM's smallest rank above 1

    # the command's base and every module load with transformers + peft and equal the culture's oracle forward
    moa_model = load_moa(run_dir)[0]
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    for culture in CULTURES:
        base = AutoModelForCausalLM.from_pretrained(words[2])
        peft_model = PeftModel.from_pretrained(base, str(out / culture)).eval()
        with torch.no_grad():
            got = peft_model(input_ids=ids).logits
            want = moa_model(input_ids=ids, culture_ids=[culture] * 2, routing="oracle").logits
        assert (got - want).abs().max() <= 1e-5, culture


def test_vllm_export_refuses_culture(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path), "--format", "vllm", "--culture", "japan",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "--culture 'japan' applies to --format merged only" in capsys.readouterr().err


def test_vllm_command_carries_the_base_specs_tokenizer_remote_code_and_4bit(tmp_path):
    spec = BaseModelConfig(path=str(tmp_path / "base"), tokenizer=str(tmp_path / "tok"), quantization="nf4",
                           trust_remote_code=True)
    words = shlex.split(vllm_command(spec.path, {"japan": tmp_path / "japan"}, 16, _vllm_options(spec)))
    assert words == ["vllm", "serve", spec.path, "--served-model-name", "base", "--tokenizer", spec.tokenizer,
                     "--trust-remote-code", "--quantization", "bitsandbytes", "--enable-lora",
                     "--lora-modules", f"japan={tmp_path / 'japan'}", "--max-lora-rank", "16", "--max-loras", "1"]
    with pytest.raises(UsageError, match="LoRA rank 600 is above vLLM's largest --max-lora-rank 512"):
        vllm_command(spec.path, {"japan": tmp_path / "japan"}, 600)
