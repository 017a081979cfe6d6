"""moa: one causal LM holding every culture's LoRA behind a learned token-level router.

`MoAConfig`, `MoAForCausalLM` and `MoACausalLMOutput` load on first use, so the `moa` command and the
modules that need no torch (configs, data schema, synthesis) start without importing torch.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["MoAConfig", "MoACausalLMOutput", "MoAForCausalLM", "__version__"]
_LAZY = {"MoAConfig": "moa.config", "MoACausalLMOutput": "moa.model", "MoAForCausalLM": "moa.model"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'moa' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
