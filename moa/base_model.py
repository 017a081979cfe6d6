"""Which base model a run adapts, and how to build it: a local transformers directory or a tiny config.

`BaseModelConfig` is what training configs hold under `model:` and what a saved MoA run stores as
`base_model.json`, so `load_moa(run_dir)` can rebuild the whole model (base + adapters + routers)
with no other input. Nothing is downloaded: a path must be a local directory.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from moa.config import from_mapping

BASE_MODEL_NAME = "base_model.json"
QUANTIZATIONS = (None, "nf4", "fp4", "int8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModelConfig:
    path: str | None = field(default=None, metadata={"help": "Local transformers model directory (config.json + safetensors)."})
    tiny: dict | None = field(default=None, metadata={"help": "Instead of a path: keyword arguments of moa.tiny.tiny_config "
                                                              "(family, hidden_size, ...) for a randomly initialised tiny model."})
    tokenizer: str | None = field(default=None, metadata={"help": "'byte' (ByT5 byte tokenizer, no files) or a local tokenizer "
                                                                  "directory; default: the model path, or 'byte' for a tiny model."})
    quantization: str | None = field(default=None, metadata={"help": "None, 'nf4' or 'fp4' (bitsandbytes 4-bit, QLoRA) or 'int8'."})
    dtype: str = field(default="float32", metadata={"help": "Compute dtype: float32, bfloat16 or float16 (also the 4-bit quant storage)."})
    seed: int = field(default=0, metadata={"help": "Initialisation seed of a tiny model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to transformers; off unless you set it."})

    def __post_init__(self):
        if (self.path is None) == (self.tiny is None):
            raise ValueError(f"model: give exactly one of 'path' (a local model directory) or 'tiny' (a tiny config), "
                             f"got path={self.path!r}, tiny={self.tiny!r}")
        if self.tiny is not None and not isinstance(self.tiny, dict):
            raise ValueError(f"model.tiny must be a mapping of tiny_config arguments, got {self.tiny!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"model.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model") -> "BaseModelConfig":
        return from_mapping(cls, data, source)


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
        raise ValueError(f"model.tokenizer {name!r} is neither 'byte' nor a local directory")
    return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=spec.trust_remote_code)


def load_base_model(spec: BaseModelConfig, device: str | torch.device = "cpu"):
    """(model, tokenizer) for a base spec; the model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    from moa.tiny import tiny_model

    if spec.path is not None and not Path(spec.path).is_dir():
        raise ValueError(f"model.path {spec.path!r} is not a local directory (nothing is downloaded)")
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


def save_base_spec(spec: BaseModelConfig, directory: str | Path) -> None:
    Path(directory, BASE_MODEL_NAME).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")


def load_moa(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(MoAForCausalLM, tokenizer) from a directory written by training (adapters, routers and base_model.json)."""
    from moa.model import MoAForCausalLM

    run_dir = Path(run_dir)
    spec_file = run_dir / BASE_MODEL_NAME
    if not spec_file.is_file():
        raise FileNotFoundError(f"{spec_file} not found: {run_dir} is not a saved MoA run (expected {BASE_MODEL_NAME} "
                                f"beside moa_config.json and moa_adapters.safetensors)")
    spec = BaseModelConfig.from_dict(json.loads(spec_file.read_text()), str(spec_file))
    base, tokenizer = load_base_model(spec, device)
    model = MoAForCausalLM.from_pretrained(run_dir, base_model=base)
    return model.eval(), tokenizer
