"""Releasing the main thread's idle OpenMP pool before the serving engine's thread computes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process's threads from /proc")

# run in a fresh interpreter: no thread of another test may start or end while the threads are counted
SCRIPT = """
import json, os, time, torch
from moa.serve import openmp
torch.set_num_threads(2)
count = lambda: len(os.listdir("/proc/self/task"))
torch.ones(1 << 22).add_(1.0)  # a parallel region: this thread now keeps a pool of workers
pooled = count()
released = openmp.release_idle_threads()
deadline = time.monotonic() + 5
while count() == pooled and time.monotonic() < deadline:
    time.sleep(0.01)
after = count()
torch.ones(1 << 22).add_(1.0)  # the runtime starts a new pool when this thread computes again
print(json.dumps({"runtime": openmp.loaded_runtime(), "released": released, "pooled": pooled, "after": after,
                  "again": count()}))
"""


def test_release_idle_threads_ends_the_calling_threads_workers():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["runtime"] is not None and got["released"] is True
    assert got["after"] == got["pooled"] - 1  # the pool's one worker (2 threads: this one and a worker) exited
    assert got["again"] == got["pooled"]
