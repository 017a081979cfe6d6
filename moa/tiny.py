"""Tiny transformers models and a byte-level tokenizer built from configs: no files, no downloads."""
from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, ByT5Tokenizer, LlamaConfig, MistralConfig, PretrainedConfig,
                          Qwen2Config)

FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def tiny_config(family: str = "llama", hidden_size: int = 64, intermediate_size: int = 128, num_hidden_layers: int = 2,
                num_attention_heads: int = 4, num_key_value_heads: int = 2, vocab_size: int = 384,
                **overrides) -> PretrainedConfig:
    """A small decoder config of a given family (`llama`, `qwen2`, `mistral`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[family](hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                            num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
                            max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                            tie_word_embeddings=False, **overrides)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> torch.nn.Module:
    """A randomly initialised causal LM from `tiny_config` (deterministic given the seed)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config), dtype=dtype)
    return model.eval()


def byte_tokenizer() -> ByT5Tokenizer:
    """ByT5's byte-level tokenizer (vocab 384 with extra ids): needs no vocabulary file."""
    return ByT5Tokenizer()
