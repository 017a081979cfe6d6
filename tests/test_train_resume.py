"""Kill a training run with SIGKILL at random points, resume it, on the same or another number of processes:
the metrics and final adapters equal an uninterrupted run's. Damaged checkpoints and cut-off metrics
lines are recovered from; the resume path unpickles nothing.

`MOA_KILL_RUNS=20 python -m pytest -q tests/test_train_resume.py -k random_points` kills 20 runs
(the default is 2, to keep the suite short).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from train_helpers import ROOT, metrics, moa_train, run_env, tiny_config, torchrun_train

pytestmark = pytest.mark.slow  # `moa train` subprocesses
STEPS = 10
TOL = 1e-6
KILL_RUNS = int(os.environ.get("MOA_KILL_RUNS", "2"))
ZERO3 = ROOT / "configs" / "deepspeed" / "zero3.json"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    return tiny_config(tmp, stages={0: {"steps": 4}, 1: {"steps": 6}}, save_interval=2, keep_checkpoints=2,
                       moa={"dropout": 0.1})  # dropout: the resumed run must also replay the random masks


@pytest.fixture(scope="module")
def full(config, tmp_path_factory):
    """The uninterrupted run, one process."""
    out = tmp_path_factory.mktemp("full") / "out"
    moa_train(config, "--output-dir", out)
    return out


def assert_same_run(ref: Path, got: Path):
    """Same train and eval rows (steps and values within TOL) and the same final adapters."""
    for kind in ("train", "eval"):
        a, b = metrics(ref, kind), metrics(got, kind)
        assert [r["step"] for r in b] == [r["step"] for r in a], kind  # rows logged after the checkpoint were dropped
        for x, y in zip(a, b):
            for key in ("loss", "lm_loss", "router_loss", "routing_accuracy", "lr", "tokens"):
                if key in x:
                    assert y[key] == pytest.approx(x[key], abs=TOL), (kind, x["step"], key)
    a = load_file(ref / "final" / "moa_adapters.safetensors")
    b = load_file(got / "final" / "moa_adapters.safetensors")
    assert set(a) == set(b)
    for key in a:
        assert (a[key] - b[key]).abs().max() <= TOL, key


def kill_at(config: Path, out: Path, ready, delay: float):
    """Start `moa train`, SIGKILL it `delay` seconds after `ready(out)` holds; False if it finished first."""
    cmd = [sys.executable, "-m", "moa", "train", str(config), "--output-dir", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ready(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def metrics_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(config, full, tmp_path):
    """Run k is killed during the save of a random checkpoint (0-50 ms after its `.partial` directory
    appears) when k is even, else at a random time (0-1 s) after a random number of metrics lines;
    then resumed to the end."""
    for k in range(KILL_RUNS):
        rng = random.Random(k)
        out = tmp_path / f"killed{k}"
        if k % 2 == 0:
            partial = f"checkpoints/step_{rng.randrange(2, STEPS + 1, 2):06d}.partial"
            ready = lambda o: (o / partial).exists()  # noqa: E731
            delay = rng.uniform(0, 0.05)
        else:
            lines = rng.randrange(1, STEPS + 2)
            ready = lambda o: metrics_lines(o) >= lines  # noqa: E731
            delay = rng.uniform(0, 1.0)
        killed = kill_at(config, out, ready, delay)
        left = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
        text = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
        result = moa_train(config, "--output-dir", out, "--resume")
        resumed = [line for line in result.stdout.splitlines() if "resume" in line]
        print(f"run {k}: killed={killed} left {left}, {text.count(chr(10))} metrics lines"
              f"{'' if text.endswith(chr(10)) or not text else ' + a cut-off one'}; {resumed}")
        assert_same_run(full, out)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(config, full, tmp_path, before, after):
    """Stop a ZeRO-3 run after 4 steps on `before` processes, resume it on `after`: equal to the uninterrupted run."""
    def train(nproc, *args):
        args = (config, "--deepspeed", ZERO3, "--output-dir", tmp_path / "out", *args)
        return moa_train(*args) if nproc == 1 else torchrun_train(nproc, *args)

    train(before, "--max-steps", 4)
    state = json.loads((tmp_path / "out" / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["world_size"] == before
    result = train(after, "--resume")
    assert "at step 4" in result.stdout
    assert_same_run(full, tmp_path / "out")


def test_damaged_newest_checkpoint_falls_back_with_warning(full, tmp_path):
    config = tiny_config(tmp_path, stages={0: {"steps": 4}, 1: {"steps": 6}}, save_interval=2, keep_checkpoints=3,
                         moa={"dropout": 0.1})  # `full`'s run, keeping one checkpoint more
    out = tmp_path / "out"
    moa_train(config, "--output-dir", out, "--max-steps", 6)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002", "step_000004", "step_000006"]
    # a cut-off optimizer file in the newest, a garbled state file in the next one
    damaged = checkpoints / "step_000006" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    (checkpoints / "step_000004" / "trainer_state.json").write_text('{"step": 4, "optim')
    # a checkpoint cut off while being written: never renamed from .partial
    shutil.copytree(checkpoints / "step_000002", checkpoints / "step_000008.partial")
    result = moa_train(config, "--output-dir", out, "--resume")
    assert f"warning: checkpoint {checkpoints / 'step_000006'} is not usable: {damaged}" in result.stderr
    assert f"{checkpoints / 'step_000004' / 'trainer_state.json'}: not a readable JSON file" in result.stderr
    assert "at step 2" in result.stdout
    assert_same_run(full, out)


def test_no_usable_checkpoint_is_an_error_naming_the_files(config, tmp_path):
    out = tmp_path / "out"
    moa_train(config, "--output-dir", out, "--max-steps", 2)
    weights = out / "checkpoints" / "step_000002" / "trainable.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = torch.zeros(1)  # a shape that does not match the model
    save_file(tensors, weights)
    result = moa_train(config, "--output-dir", out, "--resume", check=False)
    assert result.returncode == 2
    assert "no usable checkpoint" in result.stderr and f"{weights}: {name} has shape (1,)" in result.stderr


def test_cut_off_metrics_line_is_dropped(config, full, tmp_path):
    """The state a kill in the middle of a metrics append leaves: the last line cut off mid-row."""
    out = tmp_path / "out"
    moa_train(config, "--output-dir", out, "--max-steps", 5)
    shutil.rmtree(out / "checkpoints" / "step_000005")  # killed after step 5's rows, before its checkpoint
    path = out / "metrics.jsonl"
    last = path.read_text().splitlines()[-1]
    with path.open("a") as f:
        f.write(last[: len(last) // 2])
    moa_train(config, "--output-dir", out, "--resume")
    assert_same_run(full, out)


NO_PICKLE = """
import io, pickle, sys, torch
from moa.training.config import TrainConfig
from moa.training.trainer import Trainer
trainer = Trainer(TrainConfig.from_file(sys.argv[1]), output_dir=sys.argv[2], max_steps=3, resume=True, show_progress=False)
def refuse(*args, **kwargs):
    raise AssertionError("the resume path unpickled something")
class Refused(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        refuse()
for module, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
    setattr(module, name, refuse)
pickle.Unpickler = Refused
try:
    torch.load(io.BytesIO(b""))
except AssertionError:
    trainer.run()
"""


def test_resume_unpickles_nothing(config, tmp_path):
    """Resume with torch.load and every pickle loader raising (patched after the model is built): it resumes."""
    out = tmp_path / "out"
    moa_train(config, "--output-dir", out, "--max-steps", 2)
    result = subprocess.run([sys.executable, "-c", NO_PICKLE, str(config), str(out)], cwd=ROOT, env=run_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_resume_without_checkpoint_starts_fresh(config, tmp_path):
    result = moa_train(config, "--output-dir", tmp_path / "fresh", "--resume", "--max-steps", 2)
    assert "no complete checkpoint" in result.stdout
    assert [r["step"] for r in metrics(tmp_path / "fresh")] == [1, 2]
