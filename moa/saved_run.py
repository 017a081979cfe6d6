"""A saved MoA run: the files its directory holds, written atomically, read back and checked.

    RUN_DIR/moa_config.json           the MoAConfig (cultures in id order, rank, targets, router settings)
    RUN_DIR/moa_adapters.safetensors  every culture's LoRA and every layer's router, nothing of the base:
                                      <module>.lora_A [K, r, d_in], <module>.lora_B [K, d_out, r] (module
                                      names as in the base model) and routers.<layer>.<parameter>
    RUN_DIR/base_model.json           the BaseModelConfig the base model is rebuilt from (written when
                                      given; `moa.base_model.load_moa` needs it)
    RUN_DIR/tokenizer_config.json ... the tokenizer's files (written when given; what `save_pretrained`
                                      of the run's tokenizer writes), so clients such as
                                      lm-evaluation-harness load the run's tokenizer from RUN_DIR

The directory is built under a temporary name and renamed into place, so a reader sees a whole
run or the previous one. Readers check the files against each other before any model is built.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moa.atomic import atomic_directory
from moa.config import BaseModelConfig, MoAConfig
from moa.errors import UsageError

CONFIG_NAME = "moa_config.json"
WEIGHTS_NAME = "moa_adapters.safetensors"
BASE_MODEL_NAME = "base_model.json"
_KEY = re.compile(r"^(?:(?P<module>.+)\.lora_(?P<which>[AB])|routers\.(?P<layer>\d+)\.(?P<param>.+))$")


def save(run_dir: str | Path, config: MoAConfig, weights: dict[str, torch.Tensor],
         base_spec: BaseModelConfig | None = None, base_name: str = "", tokenizer=None) -> None:
    """Write a run directory atomically: the config, the adapter and router weights, and `base_spec` and
    `tokenizer` (a transformers tokenizer) if given.

    `base_name` (the base model's name or path) is recorded in the safetensors metadata.
    """
    state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    with atomic_directory(run_dir, marker=CONFIG_NAME) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "base_model": base_name})
        config.save(tmp / CONFIG_NAME)
        if base_spec is not None:
            (tmp / BASE_MODEL_NAME).write_text(json.dumps(base_spec.to_dict(), indent=2, allow_nan=False) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def _file(run_dir: str | Path, name: str) -> Path:
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a saved MoA run (expected {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}, and {BASE_MODEL_NAME} to rebuild its base model)")
    return path


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON: {err}") from None


def read_config(run_dir: str | Path) -> MoAConfig:
    path = _file(run_dir, CONFIG_NAME)
    return MoAConfig.from_dict(_json(path), str(path))


def read_base_spec(run_dir: str | Path) -> BaseModelConfig:
    path = _file(run_dir, BASE_MODEL_NAME)
    return BaseModelConfig.from_dict(_json(path), str(path))


def read(run_dir: str | Path) -> tuple[MoAConfig, BaseModelConfig]:
    """(MoAConfig, BaseModelConfig) of a complete run (all three files present), without reading the weights."""
    for name in (CONFIG_NAME, WEIGHTS_NAME, BASE_MODEL_NAME):
        _file(run_dir, name)
    return read_config(run_dir), read_base_spec(run_dir)


def read_weights(run_dir: str | Path, config: MoAConfig) -> dict[str, torch.Tensor]:
    """The adapter and router tensors, each checked against `config` (K cultures, rank r), paired A with B
    and finite."""
    path = _file(run_dir, WEIGHTS_NAME)
    try:
        weights = load_file(str(path))
    except SafetensorError as err:
        raise UsageError(f"{path}: not a readable safetensors file ({err}); the run is damaged: save or "
                         f"export it again") from None
    k, r = config.num_cultures, config.r
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise UsageError(f"{path}: unexpected tensor {key!r}: expected <module>.lora_A, <module>.lora_B "
                             f"or routers.<layer>.<parameter>")
        shape = tuple(tensor.shape)
        if match["which"] == "A":
            ok, want = len(shape) == 3 and shape[:2] == (k, r), f"[{k}, {r}, d_in]"
        elif match["which"] == "B":
            ok, want = len(shape) == 3 and (shape[0], shape[2]) == (k, r), f"[{k}, d_out, {r}]"
        else:
            ok, want = _router_shape_ok(match["param"], shape, config)
        if not ok:
            settings = (f"router_window={config.router_window}, router_dim={config.router_dim}" if match["param"]
                        else f"r={r}")
            raise UsageError(f"{path}: {key} has shape {list(shape)}, but {CONFIG_NAME} ({k} cultures, {settings}) "
                             f"needs {want}")
        if match["which"] is not None and key[:-1] + ("B" if match["which"] == "A" else "A") not in weights:
            raise UsageError(f"{path}: {key} has no lora_{'B' if match['which'] == 'A' else 'A'} beside it")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UsageError(f"{path}: {key} holds {int((~torch.isfinite(tensor)).sum())} NaN or Inf values: "
                             f"expected finite weights (the run diverged or the file is damaged)")
    return weights


def per_culture(key: str) -> bool:
    """Whether a saved tensor's first axis indexes the cultures: LoRA A and B, and the gates' rows (the rest
    of a router is shared by every culture)."""
    match = _KEY.match(key)
    return match is not None and (match["which"] is not None or match["param"] in ("gate.weight", "gate.bias"))


def select_cultures(config: MoAConfig, weights: dict[str, torch.Tensor], cultures: list[str]):
    """(config, weights) of the run restricted to `cultures`, a subset of its cultures in the order given: their
    adapter slots and gate rows, the shared router weights as they are."""
    unknown = [c for c in cultures if c not in config.cultures]
    if unknown or not cultures or len(set(cultures)) != len(cultures):
        raise UsageError(f"cultures {cultures} must be distinct and among the run's {config.cultures} (unknown: {unknown})")
    index = torch.tensor([config.cultures.index(c) for c in cultures])
    data = config.to_dict()
    data["cultures"] = list(cultures)
    if data.get("top_k", 1) > len(cultures):
        data["top_k"] = len(cultures)
    return MoAConfig(**data), {k: (v.index_select(0, index) if per_culture(k) else v) for k, v in weights.items()}


def _router_shape_ok(param: str, shape: tuple, config: MoAConfig) -> tuple[bool, str]:
    """(whether a router tensor's shape fits the config, the shape it needs); see moa.routing.TokenRouter."""
    k, dim, window = config.num_cultures, config.router_dim, config.router_window
    want = {"gate.weight": [k, dim], "gate.bias": [k], "bias": [dim], "score.weight": [1, dim],
            "taps.weight": [window * dim, "hidden_size"]}.get(param)
    if want is None:
        return False, f"a router parameter, one of gate.weight, gate.bias, bias, score.weight, taps.weight (got {param!r})"
    fixed = [w for w in want if isinstance(w, int)]
    return len(shape) == len(want) and list(shape[:len(fixed)]) == fixed, "[" + ", ".join(map(str, want)) + "]"
