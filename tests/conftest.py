"""Session-wide test setup: Triton's interpreter on machines without CUDA.

TRITON_INTERPRET must be set before `triton` is first imported (transformers imports it early, and
Triton defines its library functions at that import), so it is set here, before pytest collects
any test module. With CUDA the kernels compile and run on the GPU instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
