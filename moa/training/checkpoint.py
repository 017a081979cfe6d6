"""Resumable checkpoints as safetensors + JSON, independent of the number of processes, committed by one rename.

A checkpoint is written by rank 0 as `checkpoints/step_NNNNNN.partial/` and renamed to
`checkpoints/step_NNNNNN/` when complete:

    trainable.safetensors   every trainable parameter (adapters, routers) as its full fp32 tensor
    optimizer.safetensors   Adam's `NAME.exp_avg` and `NAME.exp_avg_sq` of each, full fp32 tensors
    adapters/               the adapters and routers exported as by `moa train` (loadable with load_moa)
    trainer_state.json      written last: step, stage, Adam's step count, the LR schedule's state

Every rank gathers the full tensors through DeepSpeed's fragment API (`safe_get_full_fp32_param`,
`safe_get_full_optimizer_state`), so the files are the same for ZeRO 0/1/2/3 and any world size, and
a run saved on N processes resumes on M. Resuming reads only these files (safetensors and JSON:
nothing is unpickled), checks them against the model (names, shapes, finite values) and falls back
to the previous complete checkpoint, with a warning naming the bad file, when the newest is damaged.
The data and dropout of a step are functions of (seed, step), so no RNG state is saved. A run killed
mid-write leaves only a `.partial` directory, which resuming ignores; older checkpoints are pruned
only after the rename.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state, safe_set_local_fp32_param, safe_set_local_optimizer_state)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moa.base_model import load_tokenizer
from moa.errors import UsageError

STATE_NAME = "trainer_state.json"
WEIGHTS_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (renamed, with its state file), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def gathered(params, modifier_rank=None):
    """Context that gathers ZeRO-3 partitioned parameters (a no-op for ZeRO 0-2); with `modifier_rank`,
    that rank's changes are written back to every partition on exit."""
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def export_adapters(engine, out_dir: Path, base_spec):
    """Every rank gathers the adapters and routers; rank 0 writes them (atomically) as safetensors, with the
    base's spec and tokenizer files."""
    model = engine.module
    with gathered(p for p in model.parameters() if p.requires_grad):  # adapters and routers
        if dist.get_rank() == 0:
            model.save_pretrained(out_dir, base_spec=base_spec, tokenizer=load_tokenizer(base_spec))
    dist.barrier()


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer: wrapped by DeepSpeed's ZeRO / mixed-precision optimizers, or DeepSpeed's optimizer itself."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _full(engine, param, key: str | None = None) -> torch.Tensor:
    """The full fp32 value of `param` (key None) or of its optimizer state `key` (collective under ZeRO-3)."""
    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if value is None:  # no ZeRO, no mixed precision: the torch optimizer holds the parameter itself
        value = param if key is None else _base_optimizer(engine).state[param][key]
    return value.detach().float().cpu().clone().contiguous()


def _set_full(engine, param, value: torch.Tensor, key: str | None = None):
    """Set the optimizer's fp32 copy of `param` (key None) or its optimizer state `key` to the full `value`."""
    if hasattr(param, "ds_id"):
        # ZeRO-3: this rank's slice of the zero-padded flat value (DeepSpeed's full-tensor setter fails
        # when the size is not a multiple of the world size)
        size, rank = param.ds_tensor.numel(), dist.get_rank()
        flat = torch.zeros(size * dist.get_world_size(), dtype=value.dtype, device=value.device)
        flat[:value.numel()] = value.flatten()
        local = flat[rank * size:(rank + 1) * size]
        if key is None:
            safe_set_local_fp32_param(param, local)
        else:
            safe_set_local_optimizer_state(param, local, key)
    elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2, bf16
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
    elif key is not None:  # no ZeRO, no mixed precision: the optimizer steps the parameter itself
        _base_optimizer(engine).state[param][key].copy_(value)


def _optimizer_step(engine) -> int:
    """Adam's step count (the same for every parameter: each is stepped once per optimizer step)."""
    steps = {int(state["step"]) for state in _base_optimizer(engine).state.values()}
    if len(steps) != 1:
        raise RuntimeError(f"expected one Adam step count over the parameters, found {sorted(steps)}")
    return steps.pop()


def save_checkpoint(engine, scheduler, directory: Path, step: int, base_spec, keep: int, state: dict):
    """Write checkpoint `step` (collective: every rank calls it; rank 0 writes)."""
    name = checkpoint_name(step)
    partial = directory / f"{name}.partial"
    rank = dist.get_rank()
    weights, moments = {}, {}
    for param_name, p in _trainable(engine):  # the same order on every rank: ZeRO-3 gathers collectively
        weights[param_name] = _full(engine, p)
        for key in MOMENTS:
            moments[f"{param_name}.{key}"] = _full(engine, p, key)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        save_file(weights, partial / WEIGHTS_NAME)
        save_file(moments, partial / OPTIMIZER_NAME)
    dist.barrier()
    export_adapters(engine, partial / "adapters", base_spec)
    if rank == 0:
        trainer_state = {"step": step, **state, "optimizer_step": _optimizer_step(engine),
                         "schedule": scheduler.state_dict()}
        (partial / STATE_NAME).write_text(json.dumps(trainer_state, indent=2, allow_nan=False) + "\n")
        final = directory / name
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for _, old in complete_checkpoints(directory)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()


def _read_tensors(path: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The tensors of `path`, which must be exactly `expected` (name -> shape) and finite."""
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{path}: tensors do not match the model's trainable parameters (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"{path}: {name} holds NaN or Inf")
    return tensors


def read_checkpoint(path: Path, shapes: dict[str, torch.Size]) -> tuple[dict, dict, dict]:
    """(trainer state, weights, moments) of checkpoint `path`, checked against the trainable
    parameters' full `shapes`; a damaged or mismatched file raises ValueError naming it."""
    state_path = path / STATE_NAME
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{state_path}: not a readable JSON file ({err})") from None
    ok = isinstance(state, dict) and all(isinstance(state.get(k), int) for k in ("step", "optimizer_step")) \
        and isinstance(state.get("schedule"), dict) and isinstance(state["schedule"].get("step_count"), int)
    if not ok:
        raise ValueError(f"{state_path}: expected an object with integer 'step' and 'optimizer_step' and "
                         f"'schedule': {{'step_count': int}}, got {str(state)[:200]}")
    if path.name != checkpoint_name(state["step"]):
        raise ValueError(f"{state_path}: step {state['step']} does not match the directory name {path.name}")
    weights = _read_tensors(path / WEIGHTS_NAME, shapes)
    moments = _read_tensors(path / OPTIMIZER_NAME, {f"{n}.{k}": s for n, s in shapes.items() for k in MOMENTS})
    return state, weights, moments


def _full_shapes(engine) -> dict[str, torch.Size]:
    return {name: p.ds_shape if hasattr(p, "ds_shape") else p.shape for name, p in _trainable(engine)}


def latest_usable_checkpoint(engine, directory: Path) -> tuple[Path, tuple[dict, dict, dict]] | None:
    """The newest complete checkpoint whose files are intact, read; None if there is no complete one.
    Each damaged one is skipped with a warning naming its file; if all are damaged, UsageError (a
    ValueError) naming each."""
    found = complete_checkpoints(directory)
    problems = []
    for _, path in reversed(found):
        try:
            return path, read_checkpoint(path, _full_shapes(engine))
        except ValueError as err:
            problems.append(str(err))
            if dist.get_rank() == 0:
                print(f"warning: checkpoint {path} is not usable: {err}; trying the previous one", file=sys.stderr)
    if problems:
        raise UsageError(f"no usable checkpoint in {directory}: " + "; ".join(problems) + " (pass --overwrite to start afresh)")
    return None


def load_checkpoint(engine, scheduler, read: tuple[dict, dict, dict]) -> int:
    """Put a checkpoint read by `read_checkpoint` into the engine and the LR schedule; returns its step.

    Every rank holds the full tensors and keeps its own partition: the model's parameters are
    written through ZeRO-3's gather (rank 0's copy is broadcast), the optimizer's fp32 copies and Adam's
    moments through the fragment API (`safe_set_full_*`; `safe_set_local_*` under ZeRO-3), or directly
    without ZeRO."""
    state, weights, moments = read
    optimizer = _base_optimizer(engine)
    # Adam's state is created at its first step: create it here. ZeRO-3 hands the torch optimizer its
    # flat fp32 partitions one at a time, so they are not in its param_groups between steps.
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    for t in flat if flat is not None else [t for group in optimizer.param_groups for t in group["params"]]:
        optimizer.state[t] = {"step": torch.tensor(float(state["optimizer_step"])),
                              **{k: torch.zeros_like(t) for k in MOMENTS}}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 and bf16: point each parameter's fragment at the new state
        link()
    trainable = _trainable(engine)
    with torch.no_grad():
        with gathered([p for _, p in trainable], modifier_rank=0):
            for name, p in trainable:
                p.data.copy_(weights[name].to(p.device, p.dtype))
        for name, p in trainable:
            _set_full(engine, p, weights[name].to(p.device))
            for key in MOMENTS:
                _set_full(engine, p, moments[f"{name}.{key}"].to(p.device), key)
    scheduler.load_state_dict(state["schedule"])
    return state["step"]
