"""Evaluation of a MoA run: label accuracy per method and culture, routing accuracy and confusion.

The names below load on first use, so `moa eval --help` starts without importing torch.
"""
import importlib

__all__ = ["METHODS", "evaluate", "predict_labels", "route_rows", "sequence_logprobs", "cultural_prompt",
           "format_markdown", "write_report"]
_MODULES = {"format_markdown": "moa.eval.report", "write_report": "moa.eval.report"}


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'moa.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES.get(name, "moa.eval.scoring")), name)
