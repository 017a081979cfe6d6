"""Releasing the main thread's idle OpenMP pool before the serving engine's thread computes."""
import os
import time
from pathlib import Path

import pytest
import torch

from moa.serve import openmp

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process's threads from /proc")


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_release_idle_threads_ends_the_calling_threads_workers():
    if torch.get_num_threads() < 2:
        pytest.skip("one intra-op thread: OpenMP starts no workers")
    torch.ones(1 << 22).add_(1.0)  # a parallel region: this thread now keeps a pool of workers
    before = threads()
    assert openmp.loaded_runtime() is not None
    assert openmp.release_idle_threads()
    deadline = time.monotonic() + 5
    while threads() > before - (torch.get_num_threads() - 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads() == before - (torch.get_num_threads() - 1)  # the workers exited
    torch.ones(1 << 22).add_(1.0)  # the runtime starts a new pool when this thread computes again
    assert threads() == before
