"""Build the base model a run adapts, from its `BaseModelConfig`: a local transformers directory or a tiny config.

`load_moa(run_dir)` rebuilds a whole saved run (base model + adapters + routers) from its files
alone, base_model.json naming the base (see moa.saved_run). Nothing is downloaded: a path must be
a local directory.
"""
from __future__ import annotations

import tempfile
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


def load_tokenizer(spec: BaseModelConfig):
    from moa.tiny import byte_tokenizer

    name = spec.tokenizer or ("byte" if spec.tiny is not None else spec.path)
    if name == "byte":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    if not Path(name).is_dir():
        raise UsageError(f"model.tokenizer {name!r} is neither 'byte' nor a local directory")
    return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=spec.trust_remote_code)


def load_base_model(spec: BaseModelConfig, device: str | torch.device = "cpu"):
    """(model, tokenizer) for a base spec; the model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    from moa.tiny import tiny_model

    if spec.path is not None and not Path(spec.path).is_dir():
        raise UsageError(f"model.path {spec.path!r} is not a local directory (nothing is downloaded)")
    if spec.tiny is not None and spec.quantization is None:
        model = tiny_model(seed=spec.seed, dtype=spec.torch_dtype, **spec.tiny).to(device)
        return model.eval(), load_tokenizer(spec)
    kwargs = {"dtype": spec.torch_dtype, "local_files_only": True, "use_safetensors": True,
              "trust_remote_code": spec.trust_remote_code}
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
        model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    if spec.quantization is None:
        model = model.to(device)
    return model.eval(), load_tokenizer(spec)


def load_moa(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(MoAForCausalLM, tokenizer) of a saved run, in eval mode on `device`; every file is checked before the base is built."""
    _, spec = saved_run.read(run_dir)
    base, tokenizer = load_base_model(spec, device)
    return MoAForCausalLM.from_pretrained(run_dir, base_model=base).eval(), tokenizer
