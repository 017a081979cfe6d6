"""moa export --format vllm: every culture as a PEFT LoRA module, the base (and its tokenizer) where vLLM finds them,
and the exact `vllm serve` command, for every kind of base.

`vllm_accepts` checks a command and the files it names by the rules of vLLM 0.33.0's source (vllm-bnb-plugin 0.0.3
for bitsandbytes), each rule citing its file; vLLM itself is not installed here.
"""
import argparse
import json
import shlex

import pytest
import torch
from helpers import fresh_base, randomize_adapters
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import moa
from moa.base_model import BaseModelConfig, load_moa
from moa.cli import main
from moa.errors import UsageError
from moa.export import vllm_command
from moa.tiny import byte_tokenizer

CULTURES = ["japan", "india", "nigeria"]
# vllm/config/lora.py: MaxLoRARanks; vllm/config/model.py: ModelDType
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MODEL_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# vllm/entrypoints/openai/models/protocol.py: LoRAModulePath
LORA_MODULE_FIELDS = {"name", "path", "base_model_name", "is_3d_lora_weight"}


def parse_lora_module(item):
    """vllm/entrypoints/common/cli_args.py, LoRAParserAction: an item with '=' and no ',' is name=path (split at the
    first '='), any other is JSON whose keys are LoRAModulePath fields; returns (name, path)."""
    if "=" in item and "," not in item:
        return tuple(item.split("=", 1))
    fields = json.loads(item)
    assert set(fields) <= LORA_MODULE_FIELDS and {"name", "path"} <= set(fields), item
    return fields["name"], fields["path"]


def vllm_accepts(command):
    """The parsed options of a `vllm serve` command, asserting each rule of vLLM's source that the command and the files
    it names must meet; returns (options, {lora name: path})."""
    words = shlex.split(command)
    assert words[:2] == ["vllm", "serve"]
    parser = argparse.ArgumentParser(exit_on_error=False)  # the options moa writes, as vLLM's parser declares them
    parser.add_argument("model_tag")
    for flag in ("--served-model-name", "--lora-modules"):
        parser.add_argument(flag, nargs="+")
    for flag in ("--dtype", "--quantization", "--tokenizer"):
        parser.add_argument(flag)
    for flag in ("--max-lora-rank", "--max-loras"):
        parser.add_argument(flag, type=int)
    for flag in ("--enable-lora", "--trust-remote-code"):
        parser.add_argument(flag, action="store_true")
    args = parser.parse_args(words[2:])
    assert args.enable_lora and args.dtype in MODEL_DTYPES and args.max_lora_rank in MAX_LORA_RANKS
    # vllm 0.33.0 has no bitsandbytes in vllm/model_executor/layers/quantization/__init__.py; vllm-bnb-plugin's
    # register() adds it, and its BitsAndBytesModelLoader quantizes a full-precision base to nf4 as it loads it
    assert args.quantization in (None, "bitsandbytes")
    config = json.loads(open(f"{args.model_tag}/config.json").read())  # vLLM loads a model from a directory
    assert "quantization_config" not in config  # full-precision weights: vLLM quantizes them itself, or not at all
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model_tag, local_files_only=True)
    assert len(tokenizer) <= config["vocab_size"]
    base = AutoModelForCausalLM.from_pretrained(args.model_tag)
    modules = dict(parse_lora_module(item) for item in args.lora_modules)
    assert len(modules) == len(args.lora_modules) and args.max_loras >= 1
    # vllm/entrypoints/openai/models/serving.py, _check_load_lora_adapter_request: a LoRA may not take a served model's name
    assert not set(modules) & set(args.served_model_name)
    for path in modules.values():
        # vllm/lora/peft_helper.py: PEFTHelper.from_dict needs r, lora_alpha, target_modules; validate_legal refuses
        # modules_to_save, DoRA, LoRA bias, bias other than "none", PiSSA-like inits and r > --max-lora-rank
        peft = json.loads(open(f"{path}/adapter_config.json").read())
        assert {"r", "lora_alpha", "target_modules"} <= set(peft) and peft["r"] <= args.max_lora_rank
        assert peft["bias"] == "none" and not peft.get("modules_to_save") and not peft.get("use_dora")
        assert not peft.get("lora_bias") and peft.get("init_lora_weights", True) is True
        # vllm/lora/utils.py, parse_fine_tuned_lora_name: base_model.model.<module>.lora_A/lora_B.weight
        for name, tensor in load_file(f"{path}/adapter_model.safetensors").items():
            module, _, which = name.removeprefix("base_model.model.").rpartition(".lora_")
            assert name.startswith("base_model.model.") and which in ("A.weight", "B.weight"), name
            linear = base.get_submodule(module)
            want = (peft["r"], linear.in_features) if which == "A.weight" else (linear.out_features, peft["r"])
            assert tuple(tensor.shape) == want, name
    return args, modules


def save_run(path, spec, cultures=CULTURES):
    model = moa.MoAForCausalLM.from_base(fresh_base("llama"), moa.MoAConfig(cultures=cultures, r=4, alpha=8))
    randomize_adapters(model, std=0.1, seed=2)
    model.save_pretrained(path, base_spec=spec)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base model directory holding its own (byte) tokenizer, as a downloaded model does."""
    path = tmp_path_factory.mktemp("base") / "llama"
    fresh_base("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def export(run_dir, out, capsys):
    assert main(["export", "--model", str(run_dir), "--format", "vllm", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    script = (out / "vllm_serve.sh").read_text()
    assert script.startswith("#!/bin/sh\n") and script.endswith(f"exec {printed[-1]} \"$@\"\n")
    assert "# checked against the source of vLLM 0.33.0 and vllm-bnb-plugin 0.0.3" in script.splitlines()
    assert (out / "vllm_serve.sh").stat().st_mode & 0o111
    return printed, script


def assert_adapters_equal_oracle(run_dir, base_path, modules):
    """Each module, loaded with transformers + PEFT onto the command's base, equals the culture's oracle forward."""
    moa_model = load_moa(run_dir)[0]
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    for culture, path in modules.items():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), path).eval()
        with torch.no_grad():
            got = peft_model(input_ids=ids).logits
            want = moa_model(input_ids=ids, culture_ids=[culture] * 2, routing="oracle").logits
        assert (got - want).abs().max() <= 1e-5, culture


@pytest.mark.slow  # saves a base, loads it and every adapter with peft
def test_tiny_base_is_written_with_its_tokenizer(tmp_path, capsys):
    run_dir = save_run(tmp_path / "run", BaseModelConfig(tiny={"family": "llama"}))
    out = tmp_path / "vllm"
    printed, _ = export(run_dir, out, capsys)
    args, modules = vllm_accepts(printed[-1])
    assert args.model_tag == str(out.resolve() / "base") and args.served_model_name == ["base"]
    assert args.dtype == "float32" and args.quantization is None and args.tokenizer is None
    assert (out / "base" / "tokenizer_config.json").is_file()  # the byte tokenizer travels with the base
    assert modules == {c: str(out.resolve() / c) for c in CULTURES}
    assert (args.max_lora_rank, args.max_loras) == (8, 3)  # r=4 rounds up to vLLM's smallest rank above 1
    assert_adapters_equal_oracle(run_dir, args.model_tag, modules)


def test_base_directory_at_full_precision_and_names_vllm_would_split(base_dir, tmp_path, capsys):
    """Culture names and an output path holding ',', '=' and spaces reach vLLM whole (JSON --lora-modules items)."""
    cultures = ["japan", "a,b=c", "south korea"]
    run_dir = save_run(tmp_path / "run", BaseModelConfig(path=str(base_dir), dtype="float32"), cultures)
    out = tmp_path / "out,=dir x"
    printed, _ = export(run_dir, out, capsys)
    args, modules = vllm_accepts(printed[-1])
    assert args.model_tag == str(base_dir.resolve()) and args.tokenizer is None  # vLLM reads the base's own tokenizer
    assert modules == {c: str(out.resolve() / c) for c in cultures}
    assert args.dtype == "float32" and args.quantization is None and not args.trust_remote_code
    assert sorted(p.name for p in out.iterdir()) == sorted(cultures + ["manifest.json", "router.safetensors", "vllm_serve.sh"])
    assert_adapters_equal_oracle(run_dir, args.model_tag, modules)


def test_byte_tokenizer_of_a_base_directory_is_written_beside_the_adapters(base_dir, tmp_path, capsys):
    run_dir = save_run(tmp_path / "run", BaseModelConfig(path=str(base_dir), tokenizer="byte", dtype="bfloat16"))
    out = tmp_path / "vllm"
    printed, _ = export(run_dir, out, capsys)
    args, _ = vllm_accepts(printed[-1])
    assert args.tokenizer == str(out.resolve() / "tokenizer") and args.dtype == "bfloat16"
    assert AutoTokenizer.from_pretrained(args.tokenizer)("hi").input_ids == byte_tokenizer()("hi").input_ids


def test_tokenizer_directory_is_passed_with_tokenizer(base_dir, tmp_path, capsys):
    tokenizer_dir = tmp_path / "tok"
    byte_tokenizer().save_pretrained(tokenizer_dir)
    run_dir = save_run(tmp_path / "run", BaseModelConfig(path=str(base_dir), tokenizer=str(tokenizer_dir),
                                                         trust_remote_code=True))
    printed, _ = export(run_dir, tmp_path / "vllm", capsys)
    args, _ = vllm_accepts(printed[-1])
    assert args.tokenizer == str(tokenizer_dir.resolve()) and args.trust_remote_code


@pytest.mark.slow  # loads the base through bitsandbytes
@pytest.mark.parametrize("tiny", [False, True])
def test_nf4_base_is_quantized_by_vllm_through_the_bitsandbytes_plugin(base_dir, tmp_path, capsys, tiny):
    """vLLM gets the full-precision weights (a tiny base is written unquantized) and quantizes them to nf4 itself."""
    where = {"tiny": {"family": "llama"}} if tiny else {"path": str(base_dir)}
    run_dir = save_run(tmp_path / "run", BaseModelConfig(**where, quantization="nf4", dtype="bfloat16"))
    out = tmp_path / "vllm"
    printed, script = export(run_dir, out, capsys)
    args, _ = vllm_accepts(printed[-1])
    assert args.quantization == "bitsandbytes" and args.dtype == "bfloat16"
    assert args.model_tag == str(out.resolve() / "base" if tiny else base_dir.resolve())
    note = ("# a 4-bit base needs vllm-bnb-plugin (pip install vllm-bnb-plugin, beside vLLM): vLLM >= 0.28 quantizes "
            "with bitsandbytes only through it")
    assert note in script.splitlines() and note in printed


@pytest.mark.parametrize("quantization,reason", [
    ("fp4", "vLLM quantizes a full-precision base while loading it to nf4 only, never fp4"),
    ("int8", "vLLM quantizes a full-precision base while loading it to 4-bit nf4 only; it reads 8-bit bitsandbytes "
             "only from a pre-quantized checkpoint, which moa does not write"),
])
def test_quantizations_vllm_cannot_reproduce_are_refused(base_dir, tmp_path, capsys, quantization, reason):
    run_dir = save_run(tmp_path / "run", BaseModelConfig(path=str(base_dir), quantization=quantization))
    out = tmp_path / "vllm"
    assert main(["export", "--model", str(run_dir), "--format", "vllm", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: --format vllm cannot serve a base with quantization {quantization!r}: {reason}, so the adapters would "
        f"run on a different base than they were trained on; serve the run with `moa serve` (or load --format peft "
        f"with transformers + PEFT), or train on an nf4 or unquantized base to serve it with vLLM\n")
    assert not out.exists()


def test_culture_names_that_clash_with_vllm_files_or_model_ids_are_refused(tmp_path, capsys):
    run_dir = save_run(tmp_path / "run", BaseModelConfig(tiny={"family": "llama"}), ["japan", "tokenizer"])
    out = tmp_path / "vllm"
    assert main(["export", "--model", str(run_dir), "--format", "vllm", "--output-dir", str(out)]) == 2
    assert "culture(s) ['tokenizer'] cannot be exported for vLLM" in capsys.readouterr().err
    config = json.loads((run_dir / "moa_config.json").read_text())
    (run_dir / "moa_config.json").write_text(json.dumps({**config, "cultures": ["japan", "base"]}))
    assert main(["export", "--model", str(run_dir), "--format", "vllm", "--output-dir", str(out)]) == 2
    assert "culture name 'base' is reserved" in capsys.readouterr().err
    assert not out.exists()


def test_vllm_export_refuses_culture(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path), "--format", "vllm", "--culture", "japan",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "--culture 'japan' applies to --format merged only" in capsys.readouterr().err


def test_lora_rank_above_vllms_largest_is_refused(tmp_path):
    with pytest.raises(UsageError, match="LoRA rank 600 is above vLLM's largest --max-lora-rank 512"):
        vllm_command(str(tmp_path / "base"), {"japan": tmp_path / "japan"}, 600)
