"""Decoding with the decode step captured in a CUDA graph: greedy, and every strategy of
``model.generate`` that a static cache can serve.

Eager decoding spends most of a small batch's step in Python (the model's modules, the cache's
bookkeeping, kernel launches): on an H100 an eager Llama-3.1-8B step takes 30-70 ms at batch 1-8
whatever the cache holds. Captured once and replayed, the step costs only its GPU time.

:func:`greedy_generate` prefills eagerly, moves the cache into fixed buffers
(:meth:`~kvtuner.cache.MixedPrecisionCache.make_static`; a transformers ``StaticCache`` already is
fixed), captures one decode step (model forward, argmax, position update) and replays it. Quantized
caches run their flushes between replays, once per flush unit. :func:`generate` takes
``model.generate``'s arguments (sampling, logits processors, stopping criteria and stop strings,
EOS per row, streamers) and replays a step that writes the next-token logits; token selection runs
between replays with transformers' own processors and criteria, so a seed gives the tokens the
eager ``model.generate`` gives. The tokens match up to floating-point differences of split sizes
(the kernel's splits are sized for the capacity, not the current length).

Example:
    >>> cache = MixedPrecisionCache(plan, model.config)
    >>> tokens = greedy_generate(model, input_ids, cache, max_new_tokens=64)
    >>> out = generate(model, input_ids, MixedPrecisionCache(plan, model.config), max_new_tokens=64,
    ...                do_sample=True, top_p=0.9, repetition_penalty=1.1)
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
    logits: torch.Tensor | None = None  # [B, vocab] fp32 next-token logits (steps that do not pick the token)


def _positions(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Position ids of the prompt tokens (left padding: counted from each row's first real token)."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class StaticDecoder:
    """One-token decode steps on a prefilled cache, replayed from a CUDA graph.

    With ``greedy=True`` the step feeds its own argmax to the next step; otherwise it writes the
    next-token logits to :attr:`logits` and the caller sets the next token with :meth:`feed`.

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
        greedy: pick the argmax inside the step (else write :attr:`logits`).
    """

    def __init__(self, model: Any, cache: Any, next_ids: torch.Tensor, position_ids: torch.Tensor,
                 cache_position: int, max_len: int, attention_mask: torch.Tensor | None = None, *,
                 cuda_graph: bool | None = None, warmup: int = 2, greedy: bool = True):
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
                        full_mask, None if greedy else torch.empty(b, model.config.get_text_config().vocab_size,
                                                                   dtype=torch.float32, device=device))
        self._run = _capture(self._forward, cache, self.io, warmup) if cuda_graph else self._forward

    def _forward(self) -> None:
        io = self.io
        logits = self.model(input_ids=io.ids, attention_mask=io.attention_mask, position_ids=io.position_ids,
                            **self._cache_arg, cache_position=io.cache_position, use_cache=True).logits
        if io.logits is None:  # greedy: the step picks its own next token
            io.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        else:
            io.logits.copy_(logits[:, -1])
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

    @property
    def logits(self) -> torch.Tensor:
        """``[B, vocab]`` fp32 logits of the last step (``greedy=False``; a buffer the next step overwrites)."""
        if self.io.logits is None:
            raise RuntimeError("a greedy StaticDecoder keeps no logits; allowed: StaticDecoder(..., greedy=False)")
        return self.io.logits

    def feed(self, tokens: torch.Tensor) -> None:
        """Set ``[B]`` or ``[B, 1]`` as the tokens the next step reads."""
        self.io.ids.copy_(tokens.reshape(self.io.ids.shape))


def _prefill(model: Any, input_ids: torch.Tensor, cache: Any, attention_mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompt ``[B, P]`` into ``cache``: the last position's logits ``[B, vocab]`` and the
    prompt's position ids ``[B, P]``."""
    b, p = input_ids.shape
    pos = _positions(attention_mask, b, p, input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, **with_cache(model, cache),
                cache_position=torch.arange(p, device=input_ids.device), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], pos


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
        logits, pos = _prefill(model, input_ids, cache, attention_mask)
        tokens = torch.empty(b, max_new_tokens, dtype=torch.long, device=device)
        tokens[:, 0] = logits.argmax(-1)
        if max_new_tokens == 1:
            return tokens
        decoder = StaticDecoder(model, cache, tokens[:, :1], pos[:, -1:] + 1, p, p + max_new_tokens, attention_mask,
                                cuda_graph=cuda_graph, warmup=warmup)
        for i in range(1, max_new_tokens):
            tokens[:, i] = decoder.step()[:, 0]
    return tokens


# strategies whose steps a static, one-token graph cannot serve: each reorders, forks or re-scores the cache
_UNSUPPORTED = {"num_beams": (1, "beam search reorders the cache every step"),
                "num_beam_groups": (1, "group beam search reorders the cache every step"),
                "penalty_alpha": (None, "contrastive search re-scores several candidates per step"),
                "assistant_model": (None, "assisted decoding verifies several tokens per step"),
                "prompt_lookup_num_tokens": (None, "prompt-lookup decoding verifies several tokens per step")}


def generate(model: Any, input_ids: torch.Tensor, cache: Any, *, attention_mask: torch.Tensor | None = None,
             generation_config: Any = None, logits_processor: Any = None, stopping_criteria: Any = None,
             streamer: Any = None, tokenizer: Any = None, cuda_graph: bool | None = None, warmup: int = 2,
             **kwargs: Any) -> torch.Tensor:
    """``model.generate(input_ids, past_key_values=cache, ...)`` with the decode step in a CUDA graph.

    Takes ``model.generate``'s arguments for decoder-only models: ``generation_config`` and its fields
    as keywords (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
    ``repetition_penalty``, ``no_repeat_ngram_size``, ``eos_token_id``, ``stop_strings``, ...),
    ``logits_processor``, ``stopping_criteria``, ``streamer`` and ``tokenizer`` (for stop strings).
    Returns ``[B, P + new]`` token ids as ``model.generate`` does: rows that finished early are padded
    with ``pad_token_id``, and decoding stops when every row has finished. On CUDA that stop is read a
    step late so the host never waits for the device: the cache may then hold one step more than the
    returned ids (its tokens are pads).

    The processors and criteria are transformers' own, built as ``model.generate`` builds them, and
    they run between graph replays on the device; the random draws are ``model.generate``'s, so a
    seed gives its tokens. Beam search, contrastive search and assisted decoding change several
    cache entries per step; they raise ``NotImplementedError`` here and run eagerly through
    ``model.generate`` with the same cache.

    Args:
        cache: an empty :class:`~kvtuner.cache.MixedPrecisionCache` or a transformers ``StaticCache``
            with room for the prompt and the new tokens.
        cuda_graph: capture the step (default: on a CUDA device); without it the same static step runs
            eagerly (how the CPU tests check it).
    """
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    if input_ids.dim() != 2:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} is invalid; allowed: [batch, prompt]")
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config is a {type(generation_config).__name__}; allowed: "
                        "transformers.GenerationConfig")
    # model.generate's own merge: the argument, then model.generation_config, then global defaults, then kwargs
    config, unused = model._prepare_generation_config(generation_config, **kwargs)
    for name, (neutral, why) in _UNSUPPORTED.items():
        value = unused.pop(name, None) if name in unused else getattr(config, name, neutral)
        if value not in (neutral, None):
            raise NotImplementedError(f"{name}={value!r}: {why}, which a captured one-token step cannot do; "
                                      f"allowed: model.generate(..., past_key_values=cache) (eager)")
    unused = {k: v for k, v in unused.items() if k not in ("output_attentions", "output_hidden_states")}
    if unused:
        raise ValueError(f"unknown generation argument(s) {sorted(unused)}; allowed: GenerationConfig fields, "
                         "logits_processor, stopping_criteria, streamer, tokenizer, attention_mask")
    if config.num_return_sequences not in (None, 1):
        raise NotImplementedError("num_return_sequences > 1 needs as many cache rows; allowed: repeat input_ids "
                                  "rows (input_ids.repeat_interleave(n, 0)) and use one sequence each")
    b, p = input_ids.shape
    device = input_ids.device
    if config.max_new_tokens is not None:
        config.max_length = p + config.max_new_tokens
    new_tokens = config.max_length - p
    if new_tokens < 1:
        raise ValueError(f"max_length={config.max_length} leaves no room after a {p}-token prompt; allowed: "
                         "max_new_tokens >= 1")
    model._prepare_special_tokens(config, attention_mask is not None, device=device)
    processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=p,
                                             encoder_input_ids=input_ids, prefix_allowed_tokens_fn=None,
                                             logits_processor=logits_processor or LogitsProcessorList(),
                                             device=device, model_kwargs={"attention_mask": attention_mask})
    criteria = model._get_stopping_criteria(generation_config=config,
                                            stopping_criteria=stopping_criteria or StoppingCriteriaList(),
                                            tokenizer=tokenizer)
    pad = config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in criteria)
    if pad is not None:
        pad = pad.to(device)
    if has_eos and pad is None:
        raise ValueError("rows that stop at EOS need pad_token_id (or eos_token_id) to fill the rest; allowed: "
                         "generate(..., pad_token_id=N)")
    unfinished = torch.ones(b, dtype=torch.long, device=device)
    sequences = input_ids
    if streamer is not None:
        streamer.put(input_ids.cpu())

    def pick(logits: torch.Tensor) -> torch.Tensor:
        nonlocal sequences, unfinished
        scores = processors(sequences, logits.to(dtype=torch.float32, copy=True))
        if config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(-1)
        if has_eos:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        unfinished = unfinished & ~criteria(sequences, scores)
        return tokens

    with torch.inference_mode():
        logits, pos = _prefill(model, input_ids, cache, attention_mask)
        tokens = pick(logits)
        del logits
        if new_tokens > 1 and unfinished.max() > 0:
            decoder = StaticDecoder(model, cache, tokens[:, None], pos[:, -1:] + 1, p, p + new_tokens,
                                    attention_mask, cuda_graph=cuda_graph, warmup=warmup, greedy=False)
            stop = _StopFlags(device, defer=streamer is None)
            for _ in range(1, new_tokens):
                decoder.step()
                decoder.feed(pick(decoder.logits))
                length = stop.check(unfinished, sequences.shape[1])
                if length is not None:
                    break
            else:
                length = stop.finish()
            if length is not None:
                sequences = sequences[:, :length]
    if streamer is not None:
        streamer.end()
    return sequences


class _StopFlags:
    """Whether every row has finished, read without stalling the host on the device each step.

    On CUDA the flag of a step is copied to pinned memory asynchronously and read once it has arrived
    (usually one step later), so the host queues the next replay meanwhile; the steps decoded past the
    stop are cut from the returned ids (their tokens are pads, and the cache holds them). Elsewhere, and
    with a streamer (which reads every token on the host anyway), it is read at once.
    """

    def __init__(self, device: torch.device, defer: bool):
        self.defer = defer and device.type == "cuda"
        self.pending: list[tuple[int, torch.Tensor, Any]] = []

    def check(self, unfinished: torch.Tensor, length: int) -> int | None:
        """The length to cut the ids to once all rows have finished, else None."""
        if not self.defer:
            return length if unfinished.max() == 0 else None
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(unfinished.max() == 0, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((length, flag, event))
        while self.pending and self.pending[0][2].query():
            done_length, done, _ = self.pending.pop(0)
            if bool(done):
                return done_length
        return None

    def finish(self) -> int | None:
        """After the last step: the earliest length at which all rows had finished, if any (waits)."""
        for length, done, event in self.pending:
            event.synchronize()
            if bool(done):
                return length
        return None


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


__all__ = ["StaticDecoder", "generate", "greedy_generate"]
