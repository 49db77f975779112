"""End-to-end quality of a plan: KL of next-token distributions against full precision."""

from __future__ import annotations

from typing import Any

import torch

from ..evaluation import kl_sum, side_by_side, stream_logits
from ..spec import KVPlan


class KLObjective:
    """Mean KL(full || plan) over calibration windows, through the real cache.

    Each window: a ``prefill``-token prefill, then the remaining tokens in ``chunk``-token steps,
    scoring the positions after the prefill. Windows of equal length run side by side in one cache.
    The full-precision side is computed once.
    """

    def __init__(self, model: Any, windows: list[torch.Tensor], *, prefill: int = 384, chunk: int = 16,
                 key_rounding: Any = None):
        # key_rounding: a kvtuner.rounding.KeyRounding given to every plan measured (as tune's plans carry it)
        self.model, self.prefill, self.chunk, self.key_rounding = model, prefill, chunk, key_rounding
        self.batches = side_by_side(windows)
        self.reference = [self._logprobs(ids, None) for ids in self.batches]

    def _logprobs(self, ids: torch.Tensor, plan: KVPlan | None) -> torch.Tensor:
        logits = stream_logits(self.model, ids[:, :-1], plan, prefill=self.prefill, chunk_size=self.chunk,
                               first=self.prefill - 1)
        return torch.log_softmax(logits.float(), -1)

    def __call__(self, plan: KVPlan) -> float:
        if self.key_rounding is not None and plan.key_rounding is None:
            plan = plan.with_key_rounding(self.key_rounding)
        total, n = 0.0, 0
        for ids, ref in zip(self.batches, self.reference):
            q = self._logprobs(ids, plan)
            total += kl_sum(ref.flatten(0, 1), q.flatten(0, 1))
            n += ref.shape[0] * ref.shape[1]
        return max(0.0, total / n)
