"""Build the base model a run adapts, from its `BaseModelConfig`: a local transformers directory, a Hugging Face Hub
id, or a tiny config.

A Hub id (`meta-llama/Meta-Llama-3-8B`) goes through transformers' own resolution and the Hugging Face
cache: HF_HOME or HF_HUB_CACHE say where the cache is, HF_HUB_OFFLINE=1 reads only the cache, and
`revision` picks a branch, tag or commit. `pin_revision` replaces a revision by the commit it resolves
to, so a trained run records the exact weights. `load_moa(run_dir)` rebuilds a whole saved run (base
model + adapters + routers) from its files alone, base_model.json naming the base (see moa.saved_run).
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from moa import saved_run
from moa.config import BaseModelConfig
from moa.errors import UsageError
from moa.model import MoAForCausalLM


def resolve_device(name: str | None) -> str:
    """The torch device a `--device` value names (None: cuda when available, else cpu), refused when it is not here."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device: expected e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name!r}, but {torch.cuda.device_count()} CUDA device(s) are available here: "
                         f"expected --device cpu{' or cuda' if torch.cuda.is_available() else ''}")
    return name


def _quantization_config(spec: BaseModelConfig):
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # quant storage in the compute dtype lets ZeRO-3 shard the packed 4-bit weights like any other tensor
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quantization,
                              bnb_4bit_compute_dtype=spec.torch_dtype, bnb_4bit_quant_storage=spec.torch_dtype,
                              bnb_4bit_use_double_quant=True)


def _hub_file(name: str, filename: str, revision: str | None, key: str) -> Path:
    """The local path of `filename` of the Hub model `name` at `revision` (from the cache, or downloaded into it unless
    HF_HUB_OFFLINE=1); a model neither cached nor reachable is a UsageError naming it."""
    from huggingface_hub import constants
    from transformers.utils import cached_file

    try:
        return Path(cached_file(name, filename, revision=revision))
    except OSError as err:
        at = f" at revision {revision!r}" if revision else ""
        hub = "HF_HUB_OFFLINE=1: the Hub is not asked" if constants.HF_HUB_OFFLINE else "nor could the Hub give it"
        raise UsageError(f"{key} {name!r}{at} is not a local directory, and the Hugging Face cache {constants.HF_HUB_CACHE} "
                         f"does not hold it ({hub}: {str(err).splitlines()[0]}). Expected a local model directory or a "
                         f"Hub id (org/name): check the id{' and revision' if revision else ''}, download it first "
                         f"(`hf download {name}{' --revision ' + revision if revision else ''}`) and point HF_HOME or "
                         f"HF_HUB_CACHE at that cache") from None


def pin_revision(spec: BaseModelConfig) -> BaseModelConfig:
    """`spec` with a Hub id's revision (None: main) replaced by the commit it resolves to; a local directory or a tiny
    model as it is."""
    if spec.path is None or Path(spec.path).is_dir():
        return spec
    config_file = _hub_file(spec.path, "config.json", spec.revision, "model.path")
    return replace(spec, revision=config_file.parent.name)  # the cache's snapshots/<commit>/config.json


def load_tokenizer(spec: BaseModelConfig):
    """The tokenizer `spec` names: the byte tokenizer, or a local directory or Hub id (the model's path at its revision
    by default)."""
    from moa.tiny import byte_tokenizer

    name = spec.tokenizer or ("byte" if spec.tiny is not None else spec.path)
    if name == "byte":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    revision = spec.revision if name == spec.path else None
    if not Path(name).is_dir():
        _hub_file(name, "tokenizer_config.json", revision, "model.tokenizer")
    return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=spec.trust_remote_code)


def load_base_model(spec: BaseModelConfig, device: str | torch.device = "cpu"):
    """(model, tokenizer) for a base spec; the model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    from moa.tiny import tiny_model

    if spec.path is not None and not Path(spec.path).is_dir():
        _hub_file(spec.path, "config.json", spec.revision, "model.path")
    if spec.tiny is not None and spec.quantization is None:
        model = tiny_model(seed=spec.seed, dtype=spec.torch_dtype, **spec.tiny).to(device)
        return model.eval(), load_tokenizer(spec)
    kwargs = {"dtype": spec.torch_dtype, "use_safetensors": True, "trust_remote_code": spec.trust_remote_code}
    if spec.quantization is not None:
        kwargs["quantization_config"] = _quantization_config(spec)
        kwargs["device_map"] = {"": device}
    if spec.tiny is not None:  # a quantized tiny model: write the fp weights, load them through bitsandbytes
        with tempfile.TemporaryDirectory() as tmp:
            # written by hand: save_pretrained writes only on rank 0 once torch.distributed is up
            full = tiny_model(seed=spec.seed, dtype=spec.torch_dtype, **spec.tiny)
            full.config.to_json_file(str(Path(tmp, "config.json")))
            save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(Path(tmp, "model.safetensors")),
                      metadata={"format": "pt"})
            model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.path, revision=spec.revision, **kwargs)
    if spec.quantization is None:
        model = model.to(device)
    return model.eval(), load_tokenizer(spec)


def load_moa(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(MoAForCausalLM, tokenizer) of a saved run, in eval mode on `device`; every file is checked before the base is built."""
    _, spec = saved_run.read(run_dir)
    base, tokenizer = load_base_model(spec, device)
    return MoAForCausalLM.from_pretrained(run_dir, base_model=base).eval(), tokenizer
