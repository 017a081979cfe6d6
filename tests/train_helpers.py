"""Helpers for training tests: config variants of configs/train/tiny-cpu.yaml and subprocess runs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny-cpu.yaml"


def tiny_config(tmp_path: Path, name: str = "train.yaml", **changes) -> Path:
    """tiny-cpu.yaml with absolute data paths and `changes` merged in (nested dicts merge; `stages` by index)."""
    config = yaml.safe_load(TINY.read_text())
    for stage in config["stages"]:
        for key in ("train", "validation"):
            stage[key] = str((TINY.parent / stage[key]).resolve())
    for key, value in changes.items():
        if key == "stages":
            for index, stage_changes in value.items():
                config["stages"][index].update(stage_changes)
        elif isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def run_env() -> dict:
    env = dict(os.environ)
    env.pop("RANK", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def moa_train(*args, cwd=ROOT, check=True, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moa", "train", *map(str, args), "--no-progress"]
    result = subprocess.run(cmd, cwd=cwd, env=run_env(), capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def torchrun_train(nproc: int, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "moa.training", *map(str, args), "--no-progress"]
    result = subprocess.run(cmd, cwd=cwd, env=run_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def metrics(out_dir: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]
