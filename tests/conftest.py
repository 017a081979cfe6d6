"""Session-wide test setup: Triton's interpreter on machines without CUDA, and `gpu` tests skipped there.

TRITON_INTERPRET must be set before `triton` is first imported (transformers imports it early, and
Triton defines its library functions at that import), so it is set here, before pytest collects
any test module. With CUDA the kernels compile and run on the GPU instead, and the tests marked
`gpu` run (`bash .ci/gpu` runs them with the GPU benchmarks).
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bash .ci/gpu runs these on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
