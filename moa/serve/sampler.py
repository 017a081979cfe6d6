"""The engine's batched sampler: every running row's next token in one pass on the model's device.

`Sampler.sample(logits, rows)` takes the last-position logits [B, V] (float32) and one `RowState` per
row, and returns one `Sample` per row after a single copy to the host. Per row, in order:

    logprobs   log_softmax of the raw logits (what the model gives the row), only where asked
    logit_bias added; presence and frequency penalties subtracted for the tokens it generated so far
    greedy     argmax (temperature 0)
    sampled    softmax(logits / temperature), the top-p nucleus, then the token at u in the cumulative
               distribution, u in (0, 1] drawn from the row's own generator (CPU), so a seeded request
               draws the same tokens whatever else shares its batch

A row whose distribution is not finite fails alone (`Sample.error`); the batch goes on. A batch in
which no row asks for logprobs, penalties or a bias pays for none of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moa.infer.sampling import SamplingParams


@dataclass
class RowState:
    """What the sampler reads of one request."""

    params: SamplingParams
    generator: torch.Generator  # CPU
    output: list[int]  # the tokens generated so far (for penalties)


@dataclass
class Sample:
    token: int = -1
    logprob: float | None = None  # of `token` under the raw distribution, where logprobs were asked
    top: list[tuple[int, float]] | None = None  # the top entries (token, logprob), where asked
    error: str | None = None


def top_entries(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest entries of each row ([B, k]); k = 0 gives empty tensors."""
    if k == 0:
        empty = logprobs.new_zeros(logprobs.shape[0], 0)
        return empty, empty.long()
    return logprobs.topk(k, dim=-1)


class Sampler:
    def sample(self, logits: torch.Tensor, rows: list[RowState]) -> list[Sample]:
        try:
            return self._sample(logits, rows)
        except Exception:  # noqa: BLE001 (isolate the row that fails: each row again on its own)
            out = []
            for row in range(len(rows)):
                try:
                    out += self._sample(logits[row:row + 1], rows[row:row + 1])
                except Exception as e:  # noqa: BLE001 (the row fails alone)
                    out.append(Sample(error=f"sampling failed: {type(e).__name__}: {e}"))
            return out

    def _sample(self, logits: torch.Tensor, rows: list[RowState]) -> list[Sample]:
        batch, vocab = logits.shape
        device = logits.device
        params = [row.params for row in rows]
        columns = []  # per-row float64 values, copied to the host once
        k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if k is not None:
            logprobs = logits.log_softmax(-1)
            top_values, top_ids = top_entries(logprobs, k)
        processed = logits
        if any(p.logit_bias for p in params):
            rows_idx = [r for r, p in enumerate(params) for _ in p.logit_bias]
            ids = [t for p in params for t, _ in p.logit_bias]
            values = [v for p in params for _, v in p.logit_bias]
            processed = processed.index_put((torch.tensor(rows_idx, device=device), torch.tensor(ids, device=device)),
                                            torch.tensor(values, device=device), accumulate=True)
        if any(p.penalized and row.output for p, row in zip(params, rows)):
            counts = torch.zeros(batch, vocab, device=device)
            rows_idx = [r for r, row in enumerate(rows) if row.params.penalized for _ in row.output]
            ids = [t for row in rows if row.params.penalized for t in row.output]
            counts.index_put_((torch.tensor(rows_idx, device=device), torch.tensor(ids, device=device)),
                              torch.ones(len(ids), device=device), accumulate=True)
            frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
            presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
            processed = processed - counts * frequency - (counts > 0).float() * presence
        tokens = processed.argmax(-1)
        finite = ~processed.isnan().any(-1) & processed.amax(-1).isfinite()
        sampled = [r for r, p in enumerate(params) if not p.greedy]
        if sampled:
            index = torch.tensor(sampled, device=device)
            temperature = torch.tensor([params[r].temperature for r in sampled], device=device)[:, None]
            probs = (processed[index] / temperature).softmax(-1)
            top_p = torch.tensor([params[r].top_p for r in sampled], device=device)[:, None]
            if bool((top_p < 1).any()):
                sorted_probs, order = probs.sort(-1, descending=True)
                outside = (sorted_probs.cumsum(-1) - sorted_probs >= top_p) & (top_p < 1)  # the nucleus keeps one token
                probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
            cdf = probs.cumsum(-1)
            u = torch.stack([1.0 - torch.rand((), generator=rows[r].generator, dtype=torch.float64) for r in sampled])
            u = u.to(device=device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
            tokens = tokens.index_put((index,), torch.searchsorted(cdf, u)[:, 0].clamp(max=vocab - 1))
            finite = finite.index_put((index,), torch.isfinite(probs).all(-1) & (cdf[:, -1] > 0))
        columns += [tokens.double()[:, None], finite.double()[:, None]]
        if k is not None:
            columns += [logprobs.gather(-1, tokens[:, None]).double(), top_values.double(), top_ids.double()]
        host = torch.cat(columns, dim=-1).cpu()
        out = []
        for r, p in enumerate(params):
            values = host[r].tolist()
            if not values[1]:
                out.append(Sample(error="the row's next-token distribution is not finite (NaN or infinite logits)"))
                continue
            sample = Sample(token=int(values[0]))
            if p.logprobs is not None:
                sample.logprob = values[2]
                sample.top = [(int(t), v) for v, t in zip(values[3:3 + p.logprobs], values[3 + k:3 + k + p.logprobs])]
            out.append(sample)
        return out


def prompt_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For positions [T, V] of one row's prompt and the tokens that follow each ([T]): each target's logprob
    and the top-k entries at its position, after one copy to the host."""
    logprobs = logits.float().log_softmax(-1)
    values, ids = top_entries(logprobs, k)
    host = torch.cat([logprobs.gather(-1, targets[:, None]).double(), values.double(), ids.double()], -1).cpu().tolist()
    return [(row[0], [(int(t), v) for v, t in zip(row[1:1 + k], row[1 + k:])]) for row in host]
