"""Tiny transformers models, a byte-level tokenizer and a toy culture-cue task: no files, no downloads."""
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


def cue_batch(n: int, num_cultures: int, seq: int = 20, cue_token: int = 300, generator: torch.Generator | None = None):
    """A toy mixed-culture batch where the culture is visible in the text.

    Each row: a random prefix of 0-3 tokens, the cue token `cue_token + c` announcing culture c,
    then a sequence where every token steps from the previous one by a stride of 7 * (c + 1)
    (mod 247, offset 3): what a culture's adapter has to learn. Returns input_ids [n, seq], labels
    (-100 up to the cue), culture ids [n] and the bool mask of positions after the cue.
    """
    if cue_token + num_cultures > 384:
        raise ValueError(f"cue tokens {cue_token}..{cue_token + num_cultures - 1} exceed the tiny vocabulary of 384")
    cultures = torch.randint(0, num_cultures, (n,), generator=generator)
    ids = torch.randint(3, 250, (n, seq), generator=generator)
    cue_pos = torch.randint(0, 4, (n,), generator=generator)
    for i in range(n):
        p = int(cue_pos[i])
        ids[i, p] = cue_token + cultures[i]
        for t in range(p + 1, seq):
            ids[i, t] = 3 + (ids[i, t - 1] - 3 + 7 * (int(cultures[i]) + 1)) % 247
    after_cue = torch.arange(seq)[None, :] > cue_pos[:, None]
    labels = torch.where(after_cue, ids, torch.full_like(ids, -100))
    return ids, labels, cultures, after_cue
