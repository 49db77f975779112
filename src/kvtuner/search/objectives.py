"""End-to-end quality of a plan: KL of next-token distributions against full precision."""

from __future__ import annotations

from typing import Any

import torch

from ..evaluate import make_cache
from ..spec import KVPlan


class KLObjective:
    """Mean KL(full || plan) over calibration windows, through the real cache.

    Each window: a ``prefill``-token prefill, then the remaining tokens in ``chunk``-token steps,
    scoring the positions after the prefill. The full-precision side is computed once.
    """

    def __init__(self, model: Any, windows: list[torch.Tensor], *, prefill: int = 384, chunk: int = 16):
        self.model, self.windows, self.prefill, self.chunk = model, windows, prefill, chunk
        self.reference = [self._logprobs(ids, None) for ids in windows]

    @torch.no_grad()
    def _logprobs(self, ids: torch.Tensor, plan: KVPlan | None) -> torch.Tensor:
        cache = make_cache(self.model, plan)
        ids = ids.to(self.model.device)
        out = [self.model(ids[:, : self.prefill], past_key_values=cache).logits[0, -1:]]
        for s in range(self.prefill, ids.shape[1] - 1, self.chunk):
            e = min(s + self.chunk, ids.shape[1] - 1)
            out.append(self.model(ids[:, s:e], past_key_values=cache).logits[0])
        return torch.log_softmax(torch.cat(out).float(), -1)

    def __call__(self, plan: KVPlan) -> float:
        total, n = 0.0, 0
        for ids, ref in zip(self.windows, self.reference):
            q = self._logprobs(ids, plan)
            total += (ref.exp() * (ref - q)).sum().item()
            n += ref.shape[0]
        return max(0.0, total / n)
