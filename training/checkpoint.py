"""Resumable checkpoints: DeepSpeed state plus the exported adapters, committed by one rename.

A checkpoint is written as `checkpoints/step_NNNNNN.partial/` (DeepSpeed's model, optimizer,
scheduler and client state, then `adapters/` as safetensors, then `trainer_state.json` last) and
renamed to `checkpoints/step_NNNNNN/` when complete. A run killed mid-write leaves only a
`.partial` directory, which resuming ignores; older checkpoints are pruned only after the rename.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import deepspeed
import torch.distributed as dist

STATE_NAME = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def gathered(params):
    """Context that gathers ZeRO-3 partitioned parameters for reading (a no-op for ZeRO 0-2)."""
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def export_adapters(engine, out_dir: Path, base_spec):
    """Every rank gathers the adapters and routers; rank 0 writes them (atomically) as safetensors."""
    model = engine.module
    with gathered(p for p in model.parameters() if p.requires_grad):  # adapters and routers
        if dist.get_rank() == 0:
            model.save_pretrained(out_dir, base_spec=base_spec)
    dist.barrier()


def save_checkpoint(engine, directory: Path, step: int, base_spec, keep: int, state: dict):
    """Write checkpoint `step` (collective: every rank calls it)."""
    name = checkpoint_name(step)
    partial = directory / f"{name}.partial"
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    dist.barrier()
    engine.save_checkpoint(str(directory), tag=partial.name, client_state={"step": step}, save_latest=False)
    export_adapters(engine, partial / "adapters", base_spec)
    if dist.get_rank() == 0:
        (partial / STATE_NAME).write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
        final = directory / name
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for _, old in complete_checkpoints(directory)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(engine, path: Path) -> int:
    """Restore DeepSpeed state from a complete checkpoint; returns its step."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if client_state is None or "step" not in client_state:
        raise RuntimeError(f"checkpoint {path} could not be loaded (no client state with the step)")
    return int(client_state["step"])
