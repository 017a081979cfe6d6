"""PEFT interop: one culture slot <-> a PEFT LoRA adapter directory.

A PEFT LoRA directory holds adapter_config.json and adapter_model.safetensors with keys
`base_model.model.<module>.lora_A.weight` ([r, d_in]) and `...lora_B.weight` ([d_out, r]).
Scalings may differ (PEFT's alpha vs ours): the ratio is folded into B, which is exact.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moa.atomic import atomic_directory
from moa.errors import UsageError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _peft_scaling(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg.get("lora_alpha", 8)
    return alpha / (r**0.5 if cfg.get("use_rslora", False) else r)


@torch.no_grad()
def load_peft_adapter(model, peft_dir, culture) -> None:
    peft_dir = Path(peft_dir)
    slot = model.config.culture_id(culture, base=False)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (peft_dir / name).is_file():
            raise FileNotFoundError(f"{peft_dir / name} not found: {peft_dir} is not a PEFT adapter directory")
    cfg = json.loads((peft_dir / PEFT_CONFIG).read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{peft_dir}: peft_type {cfg.get('peft_type')!r} is not supported, expected 'LORA'")
    if cfg.get("r") != model.config.r:
        raise ValueError(f"{peft_dir}: adapter rank r={cfg.get('r')} does not fit this model's r={model.config.r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{peft_dir}: per-module {key} {cfg[key]} is not supported (one rank and alpha per adapter)")
    if cfg.get("use_dora"):
        raise ValueError(f"{peft_dir}: DoRA adapters are not supported")
    factor = _peft_scaling(cfg) / model.config.scaling
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        tensors = load_file(str(peft_dir / PEFT_WEIGHTS))
    except SafetensorError as err:
        raise UsageError(f"{peft_dir / PEFT_WEIGHTS}: not a readable safetensors file ({err})") from None
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{peft_dir / PEFT_WEIGHTS}: unexpected tensor {key!r} (only LoRA A/B weights are supported)")
        module = match["module"]
        if module not in model.lora_layers:
            raise ValueError(f"{peft_dir}: adapter targets {module!r}, which this model does not adapt "
                             f"(target_modules={model.config.target_modules})")
        pairs.setdefault(module, {})[match["which"]] = tensor
    for module, pair in pairs.items():
        layer = model.lora_layers[module]
        want = {"A": (layer.r, layer.in_features), "B": (layer.out_features, layer.r)}
        for which, shape in want.items():
            if which not in pair:
                raise ValueError(f"{peft_dir}: {module} has no lora_{which} weight")
            if tuple(pair[which].shape) != shape:
                raise ValueError(f"{peft_dir}: {module}.lora_{which} has shape {tuple(pair[which].shape)}, "
                                 f"the base layer needs {shape}")
    for module, layer in model.lora_layers.items():
        if module in pairs:
            layer.lora_A[slot].copy_(pairs[module]["A"].to(layer.lora_A.dtype))
            layer.lora_B[slot].copy_((pairs[module]["B"].double() * factor).to(layer.lora_B.dtype))
        else:  # not adapted by this PEFT adapter: the slot acts as the base layer
            layer.lora_B[slot].zero_()


@torch.no_grad()
def export_peft_adapter(model, culture, out_dir) -> None:
    slot = model.config.culture_id(culture, base=False)
    cfg = model.config
    state = {}
    for module, layer in model.lora_layers.items():
        state[f"base_model.model.{module}.lora_A.weight"] = layer.lora_A[slot].detach().cpu().contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = layer.lora_B[slot].detach().cpu().contiguous()
    base_cfg = getattr(model.base_model, "config", None)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(base_cfg, "_name_or_path", None) or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "use_rslora": cfg.rslora,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
    }
    with atomic_directory(out_dir, marker=PEFT_CONFIG) as tmp:
        save_file(state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt", "culture": cfg.cultures[slot]})
        (tmp / PEFT_CONFIG).write_text(json.dumps(adapter_config, indent=2, allow_nan=False) + "\n")
