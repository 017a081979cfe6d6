"""Lists of token ids as one padded batch tensor, padded on the right (training, scoring) or the left (generation)."""
from __future__ import annotations

import torch


def pad(sequences: list[list[int]], value: int, left: bool = False, device=None) -> torch.Tensor:
    """LongTensor [B, longest]: each sequence followed (or, with `left`, preceded) by `value` up to the longest."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        start = width - len(seq) if left else 0
        out[row, start:start + len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out.to(device)


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool = False, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, longest]: the sequences padded with `pad_id`, the mask 1 on their tokens."""
    return pad(sequences, pad_id, left, device), pad([[1] * len(s) for s in sequences], 0, left, device)
