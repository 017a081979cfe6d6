"""Every transformers internal moa relies on, in one place.

moa reaches past transformers' public API in a few spots: the keyword that carries the KV cache
into decoder layers (and names it in model outputs), the cache object the router's running sums
go with (how many past tokens it holds), the per-layer key and value tensors the serving engine copies into its own buffers (and the cache layer that reads them there), the attention mask a forward receives, the list of decoder layers, and how
activation checkpointing is switched on. Each is read here and nowhere else, so a rename upstream
is a change to this file. Where an internal is not what moa expects, `CompatError` says what was
expected and which transformers version was found; nothing falls back silently.
"""
from __future__ import annotations

import functools

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

TRANSFORMERS_VERSION = transformers.__version__


class CompatError(RuntimeError):
    """transformers does not provide an internal moa relies on (a rename or removal upstream)."""

    def __init__(self, message: str):
        super().__init__(f"{message} (transformers {TRANSFORMERS_VERSION}; moa/compat.py reads this internal)")


def _cache_keyword() -> str:
    """The name transformers gives the KV cache: `cache` from 5.24, `past_key_values` before."""
    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    for name in ("cache", "past_key_values"):
        if name in fields:
            return name
    raise CompatError(f"CausalLMOutputWithPast has neither a 'cache' nor a 'past_key_values' field: "
                      f"found {sorted(fields)}")


CACHE_KEYWORD = _cache_keyword()


def layer_cache(kwargs: dict):
    """The KV cache a decoder layer was called with (None when caching is off).

    transformers passes it by keyword to every decoder layer, None included; a call without the
    keyword means transformers passes the cache some other way, and the router's running sums
    would be lost, so it is an error.
    """
    if CACHE_KEYWORD not in kwargs:
        raise CompatError(f"the decoder layer was called without the {CACHE_KEYWORD!r} keyword that carries the KV cache; "
                          f"it got keywords {sorted(kwargs)}")
    cache = kwargs[CACHE_KEYWORD]
    if cache is not None and not callable(getattr(cache, "get_seq_length", None)):
        raise CompatError(f"the KV cache passed as {CACHE_KEYWORD!r} is a {type(cache).__name__}; expected a "
                          f"transformers Cache with get_seq_length(layer_idx)")
    return cache


def cached_length(cache, layer_index: int) -> int:
    """How many past tokens `cache` (a transformers Cache, or None) holds for one decoder layer."""
    return 0 if cache is None else int(cache.get_seq_length(layer_index))


def output_cache(output):
    """The KV cache a transformers model output carries (None when caching is off)."""
    if CACHE_KEYWORD not in getattr(output, "__dataclass_fields__", {}):
        raise CompatError(f"{type(output).__name__} has no {CACHE_KEYWORD!r} field for the KV cache")
    return getattr(output, CACHE_KEYWORD)


def cache_kwargs(cache) -> dict:
    """Keyword arguments that pass a KV cache into a transformers model's forward."""
    return {CACHE_KEYWORD: cache}


def new_kv_cache(config):
    """An empty DynamicCache for a model of `config` whose per-layer key and value tensors
    ([batch, heads, seq, head_dim]) `kv_tensors` reads: every layer must be a plain full-attention layer."""
    cache = transformers.DynamicCache(config=config)
    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [None])}
    if kinds != {"DynamicLayer"}:
        raise CompatError(f"expected a DynamicCache of full-attention DynamicLayer layers for {config.model_type}, "
                          f"found layers {sorted(kinds)}")
    return cache


def kv_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values) [batch, heads, seq, head_dim] of a `new_kv_cache` cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


@functools.cache
def _slab_layer_class():
    """A full-attention cache layer whose keys and values live in a `moa.serve.kv_slab.KVSlab`: `update`
    writes the new token there and returns the slab's window; the length masks are built from is the
    window's."""
    base = getattr(getattr(transformers, "cache_utils", None), "DynamicLayer", None)
    if base is None:
        raise CompatError("transformers.cache_utils has no DynamicLayer to build the serving engine's cache layer on")

    class SlabLayer(base):
        def __init__(self, slab, index: int):
            super().__init__()
            self.slab, self.index = slab, index
            self.is_initialized = True

        def lazy_initialization(self, *args, **kwargs) -> None:
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            return self.slab.write(self.index, key_states, value_states)

        def get_seq_length(self, *args, **kwargs) -> int:
            return self.slab.window_length()

    return SlabLayer


def slab_kv_cache(config, slab):
    """A transformers cache for a model of `config` whose layers read and write `slab` (a KVSlab)."""
    cache = new_kv_cache(config)
    cache.layers = [_slab_layer_class()(slab, index) for index in range(len(cache.layers))]
    return cache


def forward_attention_mask(kwargs: dict) -> torch.Tensor | None:
    """The [B, S_total] padding mask a causal LM's forward was called with (None: every token attends)."""
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        what = f"a {mask.dim()}-d tensor" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
        raise CompatError(f"the model's forward got {what} as attention_mask; expected a [batch, seq] padding mask")
    return mask


# Attributes a base model reads off its decoder layers, which `MoADecoderLayer` passes through to the
# layer it wraps (transformers 4.x reads `attention_type` to pick each layer's mask). Nothing else
# passes through: frameworks that tag modules with attributes (DeepSpeed ZeRO-3's hooks) must see the
# wrapper and the layer as two modules.
LAYER_ATTRIBUTES = ("attention_type",)


def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The ModuleList of decoder layers and its dotted name: the longest ModuleList of blocks holding linears."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (best is None or len(module) > len(best[0])):
            if any(isinstance(m, nn.Linear) or "Linear" in type(m).__name__ for m in module[0].modules()):
                best = (module, name)
    if best is None:
        raise CompatError(f"{type(model).__name__} has no list of decoder layers (an nn.ModuleList of blocks with "
                          f"linear layers) to adapt")
    return best


def enable_activation_checkpointing(model: nn.Module, checkpoint_kwargs: dict) -> None:
    """Turn on activation checkpointing of a transformers model's decoder layers with these
    torch.utils.checkpoint keyword arguments."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs)
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)  # transformers 4
    if enable is None:
        raise CompatError(f"{type(model).__name__} has neither activation_checkpointing_enable nor "
                          f"gradient_checkpointing_enable")
    enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
