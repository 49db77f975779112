"""Greedy decoding with the decode step captured in a CUDA graph.

Eager decoding spends most of a small batch's step in Python (the model's modules, the cache's
bookkeeping, kernel launches): on an H100 an eager Llama-3.1-8B step takes 30-70 ms at batch 1-8
whatever the cache holds. Captured once and replayed, the step costs only its GPU time.

:func:`greedy_generate` prefills eagerly, moves the cache into fixed buffers
(:meth:`~kvtuner.cache.MixedPrecisionCache.make_static`; a transformers ``StaticCache`` already is
fixed), captures one decode step (model forward, argmax, position update) and replays it. Quantized
caches run their flushes between replays, once per flush unit. The tokens are those of greedy
``model.generate`` up to floating-point differences of split sizes (the kernel's splits are sized
for the capacity, not the current length).

Example:
    >>> cache = MixedPrecisionCache(plan, model.config)
    >>> tokens = greedy_generate(model, input_ids, cache, max_new_tokens=64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .models import with_cache


@dataclass
class _Step:
    """The static inputs and outputs a captured decode step reads and writes."""

    ids: torch.Tensor  # [B, 1] the token fed to the step (then the step's own argmax)
    position_ids: torch.Tensor  # [B, 1]
    cache_position: torch.Tensor  # [1]
    attention_mask: torch.Tensor | None  # [B, max_len] for caches that read the model's mask


def _positions(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Position ids of the prompt tokens (left padding: counted from each row's first real token)."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class StaticDecoder:
    """Greedy one-token decode steps on a prefilled cache, replayed from a CUDA graph.

    Args:
        model: a transformers causal LM.
        cache: a prefilled :class:`~kvtuner.cache.MixedPrecisionCache` (made static here) or a
            transformers ``StaticCache``.
        next_ids: ``[B, 1]`` the first token to feed.
        position_ids: ``[B, 1]`` its positions; ``cache_position``: its storage slot (tokens cached).
        max_len: tokens the cache must hold in all.
        attention_mask: ``[B, P]`` padding mask of what is cached, or None.
        cuda_graph: capture and replay (default: on CUDA); otherwise the same step runs eagerly.
        warmup: eager steps before capture; their effects on the cache are undone.
    """

    def __init__(self, model: Any, cache: Any, next_ids: torch.Tensor, position_ids: torch.Tensor,
                 cache_position: int, max_len: int, attention_mask: torch.Tensor | None = None, *,
                 cuda_graph: bool | None = None, warmup: int = 2):
        from .cache import MixedPrecisionCache

        device = next_ids.device
        cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if cuda_graph and device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device")
        self.quantized = isinstance(cache, MixedPrecisionCache)
        if not self.quantized and not getattr(cache, "is_compileable", False):
            raise TypeError(f"{type(cache).__name__} cannot be captured; allowed: MixedPrecisionCache or a "
                            "transformers StaticCache")
        self.model, self.cache = model, cache
        self._cache_arg = with_cache(model, cache)  # the keyword is fixed per model class: decide it once
        b = next_ids.shape[0]
        full_mask = None
        if self.quantized:
            cache.make_static(max_len, attention_mask)
        elif attention_mask is not None:
            full_mask = torch.ones(b, max_len, dtype=attention_mask.dtype, device=device)
            full_mask[:, : attention_mask.shape[1]] = attention_mask
        self.io = _Step(next_ids.clone(), position_ids.clone(), torch.tensor([cache_position], device=device),
                        full_mask)
        self._run = _capture(self._forward, cache, self.io, warmup) if cuda_graph else self._forward

    def _forward(self) -> None:
        io = self.io
        logits = self.model(input_ids=io.ids, attention_mask=io.attention_mask, position_ids=io.position_ids,
                            **self._cache_arg, cache_position=io.cache_position, use_cache=True).logits
        io.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        io.position_ids.add_(1)
        io.cache_position.add_(1)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """One decode step; returns the new tokens ``[B, 1]`` (a buffer the next step overwrites)."""
        if self.quantized:
            self.cache.before_step()
        self._run()
        if self.quantized:
            self.cache.after_step()
        return self.io.ids


def greedy_generate(model: Any, input_ids: torch.Tensor, cache: Any, max_new_tokens: int,
                    attention_mask: torch.Tensor | None = None, *, cuda_graph: bool | None = None,
                    warmup: int = 2) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` ``[B, P]``: returns the new tokens ``[B, max_new_tokens]``.

    Args:
        model: a transformers causal LM whose forward accepts a cache (``cache`` or ``past_key_values``),
            ``position_ids`` and ``cache_position``.
        cache: an empty :class:`~kvtuner.cache.MixedPrecisionCache` (made static after the prefill)
            or a transformers ``StaticCache`` with room for ``P + max_new_tokens`` tokens.
        attention_mask: the prompt's ``[B, P]`` padding mask (1 = token), or None.
        cuda_graph: capture and replay the decode step (default: on a CUDA device). Without it
            the same static step runs eagerly, which is how the CPU tests check the bookkeeping.
        warmup: eager steps before capture (compiles kernels, initialises libraries); their
            effects on the cache are undone.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid; allowed: >= 1")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} is invalid; allowed: [batch, prompt]")
    device = input_ids.device
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device")
    b, p = input_ids.shape
    with torch.inference_mode():
        pos = _positions(attention_mask, b, p, device)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, **with_cache(model, cache),
                    cache_position=torch.arange(p, device=device), use_cache=True, logits_to_keep=1)
        tokens = torch.empty(b, max_new_tokens, dtype=torch.long, device=device)
        tokens[:, 0] = out.logits[:, -1].argmax(-1)
        if max_new_tokens == 1:
            return tokens
        decoder = StaticDecoder(model, cache, tokens[:, :1], pos[:, -1:] + 1, p, p + max_new_tokens, attention_mask,
                                cuda_graph=cuda_graph, warmup=warmup)
        for i in range(1, max_new_tokens):
            tokens[:, i] = decoder.step()[:, 0]
    return tokens


def _counters(cache: Any) -> list[torch.Tensor]:
    """The cache's small integer device tensors (its step counters), which a warm-up step advances:
    kvtuner's state rows, or the ``cumulative_length`` tensors of recent transformers static layers."""
    found = [cache._state] if hasattr(cache, "_state") else []
    for layer in getattr(cache, "layers", []):
        found += [v for v in vars(layer).values()
                  if torch.is_tensor(v) and not v.is_floating_point() and v.numel() <= 16]
    return found


def _capture(forward: Any, cache: Any, step: _Step, warmup: int) -> Any:
    """Warm up ``forward`` on a side stream, undo its effects, capture it; returns the replay."""
    live = [step.ids, step.position_ids, step.cache_position, *_counters(cache)]
    saved = [t.clone() for t in live]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(warmup):  # writes only the next slot, which the real step rewrites
            forward()
            for t, s in zip(live, saved):
                t.copy_(s)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        forward()
    return graph.replay


__all__ = ["StaticDecoder", "greedy_generate"]
