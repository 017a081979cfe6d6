"""Kill a training run with SIGKILL, resume it: the losses after resuming equal an uninterrupted run's."""
import shutil
import signal
import subprocess
import sys
import time

import pytest

from moa.base_model import load_moa
from train_helpers import ROOT, metrics, moa_train, run_env, tiny_config

pytestmark = pytest.mark.slow  # `moa train` subprocesses
STEPS = 10


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    return tiny_config(tmp, stages={0: {"steps": 4}, 1: {"steps": 6}}, save_interval=2, keep_checkpoints=2,
                       moa={"dropout": 0.1})  # dropout: the resumed run must also replay the random masks


def test_sigkill_then_resume_matches_uninterrupted(config, tmp_path):
    full = tmp_path / "full"
    moa_train(config, "--output-dir", full)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "moa", "train", str(config), "--output-dir", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_000004").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step_000004" in done and "step_000010" not in done

    # a checkpoint cut off while being written: never renamed from .partial, half its files missing
    partial = out / "checkpoints" / "step_000008.partial"
    if not partial.exists():
        shutil.copytree(out / "checkpoints" / "step_000004", partial)
        (partial / "trainer_state.json").unlink()
        for f in partial.glob("*.pt"):
            f.write_bytes(f.read_bytes()[:100])

    result = moa_train(config, "--output-dir", out, "--resume")
    assert "resumed from" in result.stdout and "step_0000" in result.stdout
    ref, got = metrics(full), metrics(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # rows logged after the checkpoint were dropped
    for a, b in zip(ref, got):
        for key in ("loss", "lm_loss", "router_loss", "routing_accuracy", "lr", "tokens"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)
    model, _ = load_moa(out / "final")
    ref_model, _ = load_moa(full / "final")
    for key, value in ref_model.adapter_state_dict().items():
        assert (model.adapter_state_dict()[key] - value).abs().max() <= 1e-6, key


def test_resume_without_checkpoint_starts_fresh(config, tmp_path):
    result = moa_train(config, "--output-dir", tmp_path / "fresh", "--resume", "--max-steps", 2)
    assert "no complete checkpoint" in result.stdout
    assert [r["step"] for r in metrics(tmp_path / "fresh")] == [1, 2]
