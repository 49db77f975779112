"""Quality of a plan, measured through the real cache (prefill, then teacher-forced decode)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .spec import KVPlan


def make_cache(model: Any, plan: KVPlan | None):
    """A :class:`MixedPrecisionCache` for ``plan``, or a full-precision ``DynamicCache`` for None."""
    from transformers import DynamicCache

    from .cache import MixedPrecisionCache

    if plan is None:
        return DynamicCache(config=model.config)
    return MixedPrecisionCache(plan, model.config)


@torch.no_grad()
def perplexity(model: Any, input_ids: torch.Tensor, plan: KVPlan | None = None, *, prefill: int | None = None,
               chunk_size: int = 1) -> float:
    """Perplexity of ``input_ids`` ``[1, N]`` with the KV cache of ``plan`` (None: full precision).

    The first ``prefill`` tokens go in one forward pass; the rest are fed ``chunk_size`` tokens at a
    time through the same cache (teacher forcing), so quantized history, residual window and group
    flushes are all exercised as in generation. Every token after the first is scored.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} is invalid; allowed: [1, N] with N >= 2")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid; allowed: >= 1")
    n = input_ids.shape[1]
    prefill = min(n, prefill or chunk_size)
    bounds = [0, *range(prefill, n, chunk_size), n]
    cache = make_cache(model, plan)
    ids = input_ids.to(model.device)
    nll, count = 0.0, 0
    for start, stop in zip(bounds[:-1], bounds[1:]):
        logits = model(ids[:, start:stop], past_key_values=cache, use_cache=True).logits[0].float()
        targets = ids[0, start + 1: stop + 1]
        nll += torch.nn.functional.cross_entropy(logits[: len(targets)], targets, reduction="sum").item()
        count += len(targets)
    return math.exp(nll / count)
