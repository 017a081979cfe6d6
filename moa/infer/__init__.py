"""Batched generation where every row may use a different culture, one forward pass per step.

The names below load on first use, so `moa generate --help` starts without importing torch.
"""
import importlib

__all__ = ["generate_rows", "read_prompts"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'moa.infer' has no attribute {name!r}")
    return getattr(importlib.import_module("moa.infer.generate"), name)
