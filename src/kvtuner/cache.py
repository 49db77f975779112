"""A transformers ``Cache`` whose every layer stores K and V at its own precision.

Each layer keeps, for keys and for values separately, append-only packed storage (codes +
scales/zeros, see ``quant.py``) and a full-precision residual of the newest tokens:

* prefill: everything except the residual window is quantized at once;
* decode: new tokens go to the residual; once ``residual_length + flush_unit`` tokens wait, the
  oldest ``flush_unit`` are quantized once and appended to packed storage. History is never
  re-quantized and never held twice.
* attention sinks (``QuantSpec.sink_length``): the sequence's first tokens stay in full precision at
  the front of the residual buffer for good; flushes take the tokens after them. In sequence order
  a store holds ``[sink, packed, newest]``; the fused kernel reads ``[packed, sink + newest]``, the
  same set of keys and values (attention does not depend on their order), with the padding mask
  permuted to match.

Attention runs through the model's own attention function on the dequantized history (the CPU
reference path); the fused GPU kernel reads the packed storage directly.

Example:
    >>> plan = KVPlan.uniform(model.config.num_hidden_layers, 4, 2, mode="kivi")
    >>> cache = MixedPrecisionCache(plan, model.config)
    >>> out = model.generate(**inputs, **kvtuner.with_cache(model, cache), max_new_tokens=64)
    >>> cache.nbytes()
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import kernels, quant
from .spec import KVPlan, LayerSpec, PlanError, QuantSpec


class _TensorStore:
    """Packed history plus full-precision residual for the keys *or* the values of one layer.

    Packed storage lives in buffers with spare capacity that grow geometrically (or are sized once
    from ``capacity``), so a flush writes only the new block in place instead of copying the whole
    history as ``torch.cat`` would. ``packed`` is a view of the filled part.
    """

    def __init__(self, spec: QuantSpec, role: str, head_dim: int, capacity: int | None = None,
                 value_spec: QuantSpec | None = None, sliding: bool = False):
        self.spec, self.role, self.head_dim = spec, role, head_dim
        self.sink = spec.kept_sink(sliding)  # full-precision attention-sink tokens at the residual's front
        self.value_spec = value_spec  # keys: the layer's value spec (key layout follows the value layout)
        self.granularity = spec.granularity(role)
        self.group = spec.group_size if self.granularity == "per_channel" else spec.channel_group(head_dim)
        self.unit = spec.flush_unit(role)
        self.capacity = capacity
        self.token_block = 0  # decided at the first write (value_token_block)
        self.channel_words = False  # decided at the first write (channel_words)
        self._buf: quant.QuantizedTensor | None = None
        self._n = 0
        self.residual: torch.Tensor | None = None

    @property
    def packed(self) -> quant.QuantizedTensor | None:
        return None if self._buf is None or self._n == 0 else quant.slice_tokens(self._buf, 0, self._n)

    @packed.setter
    def packed(self, value: quant.QuantizedTensor | None) -> None:
        self._buf, self._n = value, (0 if value is None else value.num_tokens)

    @property
    def num_quantized(self) -> int:
        return self._n

    @property
    def num_residual(self) -> int:
        return 0 if self.residual is None else self.residual.shape[-2]

    def __len__(self) -> int:
        return self.num_quantized + self.num_residual

    @property
    def held_sink(self) -> int:
        """Sink tokens at the residual's front that come before the packed tokens in sequence order
        (0 while nothing is packed: the residual alone is then in sequence order)."""
        return self.sink if self._n else 0

    def _meta_rows(self, tokens: int) -> int:
        return -(-tokens // self.group) if self.granularity == "per_channel" else tokens

    def _write(self, block: quant.QuantizedTensor) -> None:
        if self._buf is None:
            self._choose_layout(block.codes.device)
        if self.channel_words:
            block = quant.in_channel_words(block)
        if self.token_block:
            block = quant.in_token_blocks(block, self.token_block)
        n, m = self._n, block.num_tokens
        cap = 0 if self._buf is None else self._buf.num_tokens
        if n + m > cap:
            if self.static is not None:  # a captured graph holds the buffer's address
                raise RuntimeError(f"static cache full: {n + m} quantized tokens > capacity {cap}; allowed: at most "
                                   "the max_len given to make_static")
            self._reserve(max(n + m, 2 * cap, 256, self.capacity or 0), block)
        self._copy_in(block, n)
        self._n = n + m

    def _choose_layout(self, device: torch.device) -> None:
        self.token_block = value_token_block(self.spec, self.role, self.head_dim, device)
        self.channel_words = channel_words(self.spec, self.value_spec, self.role, self.head_dim, device)

    def _reserve(self, want: int, like: quant.QuantizedTensor) -> None:
        """Reallocate packed storage for ``want`` tokens (shapes/dtypes from ``like``), keeping what is filled."""
        if self.granularity == "per_channel":
            want = -(-want // self.group) * self.group
        old = self.packed

        def grow(t: torch.Tensor, rows: int) -> torch.Tensor:
            return t.new_empty(*t.shape[:-2], rows, t.shape[-1])

        rows = self._meta_rows(want)
        self._buf = quant.QuantizedTensor(grow(like.codes, want), grow(like.scale, rows), grow(like.zero, rows),
                                          like.bits, like.granularity, like.group_size, like.head_dim,
                                          self.token_block, self.channel_words)
        if old is not None:
            self._copy_in(old, 0)

    # ---------------------------------------------- static buffers (CUDA-graph decode)
    # A captured graph replays fixed addresses and launch arguments, so in static mode the packed
    # buffer is sized once, the residual lives in ``residual_length + flush_unit`` fixed slots, and
    # the counts the kernel needs sit in a device tensor the caller keeps. Decode steps write into
    # the slot that tensor names; flushes run between steps, eagerly (once per flush unit).
    static = None  # the fixed residual buffer [B, H, residual_length + unit, D] once static

    def make_static(self, tokens: int, like: torch.Tensor) -> None:
        """Room for ``tokens`` stored tokens in fixed buffers; ``like`` gives batch, heads, dtype."""
        b, h, _, d = like.shape
        cap = -(-tokens // self.unit) * self.unit
        if self._buf is None or self._buf.num_tokens < cap:
            if self._buf is None:
                self._choose_layout(like.device)
            template = _quantize(like.new_zeros(b, h, self.unit, d), self.spec.bits, self.granularity, self.group)
            self._reserve(cap, template)
        slots = self.sink + self.spec.residual_length + self.unit
        if self.num_residual > slots:
            raise RuntimeError(f"{self.num_residual} residual tokens exceed the {slots} static slots")
        buf = like.new_zeros(b, h, slots, d)
        if self.num_residual:
            buf[..., : self.num_residual, :].copy_(self.residual)
        self.static = buf
        self.residual = buf[..., : self.num_residual, :]

    def static_write(self, x: torch.Tensor, slot: torch.Tensor) -> None:
        """Put one decode token per sequence into residual slot ``slot`` (a device index: capturable)."""
        if self.spec.rotation:
            x = quant.rotate(x)
        self.static.index_copy_(2, slot, x.to(self.static.dtype))

    def static_flush_due(self) -> bool:
        """Before a step: whether the oldest unit must be quantized for the cache to match ``append``.

        ``append`` flushes once ``residual_length + unit`` tokens wait, the new one included; with a
        residual window of at least one token the flushed unit holds only older tokens, so flushing
        it before the step gives the same storage. Without a window the unit waits one step longer.
        """
        n = self.num_residual - self.sink
        return n >= self.unit and n + 1 >= self.spec.residual_length + self.unit

    def static_flush(self) -> None:
        n, u, s = self.num_residual, self.unit, self.sink
        self._write(_quantize(self.static[..., s:s + u, :], self.spec.bits, self.granularity, self.group))
        self.static[..., s:n - u, :].copy_(self.static[..., s + u:n, :].clone())
        self.residual = self.static[..., : n - u, :]

    def static_count(self, added: int) -> None:
        """Host bookkeeping for ``added`` decode tokens the device already wrote."""
        self.residual = self.static[..., : self.num_residual + added, :]

    def _copy_in(self, block: quant.QuantizedTensor, at: int) -> None:
        m, r0 = block.num_tokens, self._meta_rows(at)
        self._buf.codes[..., at:at + m, :].copy_(block.codes)
        self._buf.scale[..., r0:r0 + block.scale.shape[-2], :].copy_(block.scale)
        self._buf.zero[..., r0:r0 + block.zero.shape[-2], :].copy_(block.zero)

    def append(self, x: torch.Tensor) -> None:
        if self.spec.rotation:  # everything this store holds, residual included, lives in rotated space
            x = quant.rotate(x)
        self.residual = x if self.residual is None else torch.cat([self.residual, x], dim=-2)
        if not self.spec.quantized:
            return
        s = self.sink
        n = max(0, (self.num_residual - s - self.spec.residual_length) // self.unit * self.unit)
        if n:
            self._write(_quantize(self.residual[..., s:s + n, :], self.spec.bits, self.granularity, self.group))
            # a copy, not a view: a view would keep the whole prefill tensor alive behind nbytes()
            rest = self.residual[..., s + n:, :]
            self.residual = torch.cat([self.residual[..., :s, :], rest], dim=-2) if s else rest.clone()

    def reserved_nbytes(self) -> int:
        """Bytes allocated, spare capacity included (``nbytes`` counts only what is filled)."""
        total = 0 if self._buf is None else self._buf.nbytes()
        res = self.static if self.static is not None else self.residual
        if res is not None:
            total += res.numel() * res.element_size()
        return total

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        """Everything stored, in sequence order (sink, packed, newest), in ``dtype``."""
        h = self.held_sink
        if h:
            res = self.residual
            out = torch.cat([res[..., :h, :].to(dtype), quant.materialize(self.packed, res[..., h:, :], dtype)], dim=-2)
        else:
            out = quant.materialize(self.packed, self.residual, dtype)
        return quant.rotate(out, dtype) if self.spec.rotation else out

    def drop_front(self, n: int) -> None:
        """Forget the ``n`` oldest tokens (per-channel stores: ``n`` is a multiple of the group)."""
        k = min(n, self.num_quantized)
        if k:
            self.packed = None if k == self.num_quantized else quant.slice_tokens(self.packed, k, self.num_quantized)
        if n > k:
            self.residual = self.residual[..., n - k:, :]

    def drop_back(self, n: int) -> None:
        """Forget the ``n`` newest tokens.

        When the cut falls inside a per-channel key group (or a token block of values), the surviving
        part of that group is dequantized back into the residual (its values are the ones attention
        already saw) and is quantized again on the next flush: the one case where tokens are
        re-quantized. Sink tokens go last, after every packed token.
        """
        h = self.held_sink
        k = min(n, self.num_residual - h)
        if k:
            self.residual = self.residual[..., : self.num_residual - k, :]
        m = n - k
        if not m:
            return
        if m >= self.num_quantized:  # every packed token, then sink tokens from the newest
            self.residual = self.residual[..., : h - (m - self.num_quantized), :]
            self.packed = None
            return
        keep = self.num_quantized - m
        whole = self.granularity == "per_channel" or self.token_block  # stored in whole units
        cut = keep // self.unit * self.unit if whole else keep
        tail = None
        if cut < keep:
            tail = quant.dequantize(quant.slice_tokens(self.packed, cut, self.num_quantized),
                                    self.residual.dtype)[..., : keep - cut, :]
        self.packed = quant.slice_tokens(self.packed, 0, cut) if cut else None
        if tail is not None:  # the residual holds only the sink here: the tail follows it
            self.residual = torch.cat([self.residual, tail], dim=-2)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.packed is not None:
            self.packed = self.packed.map(fn)
        if self.residual is not None:
            self.residual = fn(self.residual)

    def nbytes(self) -> int:
        total = 0 if self.packed is None else self.packed.nbytes()
        if self.residual is not None:
            total += self.residual.numel() * self.residual.element_size()
        return total


class QuantizedKVLayer(CacheLayerMixin):
    """One decoder layer's cache: keys and values each with their own :class:`QuantSpec`.

    Args:
        spec: the layer's (k, v) specs.
        num_kv_heads, head_dim: the shape the model will hand to ``update``; other shapes are an
            error (a cache used with the wrong model).
        layer_idx: for error messages.
        sliding_window: set for sliding-window attention layers; tokens older than the window are
            dropped, in whole key groups for KIVI keys (the mask is told via ``get_mask_sizes``).
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, spec: LayerSpec, *, num_kv_heads: int, head_dim: int, layer_idx: int = 0,
                 sliding_window: int | None = None, capacity: int | None = None):
        super().__init__()
        self.spec, self.num_kv_heads, self.head_dim, self.layer_idx = spec, num_kv_heads, head_dim, layer_idx
        self.sliding_window, self.capacity = sliding_window, capacity
        if (spec.k.rotation or spec.v.rotation) and head_dim & (head_dim - 1):
            raise PlanError(f"layer {layer_idx}: rotation needs a power-of-two head_dim; got {head_dim} "
                            "(allowed: rotation=false for this model)")
        if spec.k.quantized and spec.v.quantized and spec.k.sink_length != spec.v.sink_length:
            raise PlanError(f"layer {layer_idx}: k.sink_length={spec.k.sink_length} and v.sink_length="
                            f"{spec.v.sink_length} differ; allowed: equal (keys and values flush in step)")
        self.fused_attention = False  # set by MixedPrecisionCache when the "kvtuner" attention is active
        self.is_sliding = sliding_window is not None
        self.is_croppable = not self.is_sliding
        self._clear()

    def _clear(self) -> None:
        sliding = self.is_sliding
        self._k = _TensorStore(self.spec.k, "key", self.head_dim, self.capacity, value_spec=self.spec.v,
                               sliding=sliding)
        self._v = _TensorStore(self.spec.v, "value", self.head_dim, self.capacity, sliding=sliding)
        self.cumulative_length = 0  # tokens seen
        self.start = 0  # absolute position of the oldest stored token (> 0 only for sliding layers)
        self.is_initialized = False

    def __repr__(self) -> str:
        return f"QuantizedKVLayer({self.spec.name}, {self.spec.k.mode}, sliding={self.sliding_window})"

    # ------------------------------------------------------------------ CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = key_states.shape[0]
        self.is_initialized = True

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        want = (self.num_kv_heads, self.head_dim)
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if t.dim() != 4 or (t.shape[1], t.shape[3]) != want:
                raise ValueError(
                    f"layer {self.layer_idx}: {name} shape {tuple(t.shape)} does not fit this cache; allowed: "
                    f"[batch, {want[0]}, tokens, {want[1]}] (the cache was built for another model config)")
        if key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(f"layer {self.layer_idx}: key/value shapes {tuple(key_states.shape)} and "
                             f"{tuple(value_states.shape)} differ in batch or tokens; allowed: equal")
        if self.is_initialized and len(self._k) and key_states.shape[0] != self.batch_size:
            raise ValueError(f"layer {self.layer_idx}: batch size {key_states.shape[0]} does not match the "
                             f"cached batch size {self.batch_size}; allowed: {self.batch_size} (call reset())")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(key_states, value_states)
        if not self.is_initialized or not len(self._k):
            self.lazy_initialization(key_states, value_states)
        if self._k.static is not None:
            if key_states.shape[-2] != 1:
                raise RuntimeError(f"layer {self.layer_idx}: a static cache takes one token per step; got "
                                   f"{key_states.shape[-2]} (prefill before make_static)")
            from .attention import PackedKV

            self._k.static_write(key_states, self._slot)
            self._v.static_write(value_states, self._slot)
            return PackedKV.wrap(self, key_states), PackedKV.wrap(self, value_states)
        self._k.append(key_states)
        self._v.append(value_states)
        self.cumulative_length += key_states.shape[-2]
        if key_states.shape[-2] == 1 and self._fusable(key_states):
            from .attention import PackedKV

            return PackedKV.wrap(self, key_states), PackedKV.wrap(self, value_states)
        keys, values = self._k.materialize(self.dtype), self._v.materialize(self.dtype)
        if self.is_sliding:
            self._evict()
        return keys, values

    def _fusable(self, key_states: torch.Tensor) -> bool:
        """Decode can run the fused kernel: CUDA + Triton backend, the ``"kvtuner"`` attention function
        selected, a full-attention layer, quantized keys and values flushed in step."""
        k, v = self.spec.k, self.spec.v
        return (self.fused_attention and not self.is_sliding and k.quantized and v.quantized
                and self._k.num_quantized == self._v.num_quantized and kernels.use_triton(key_states.device))

    def stored_tokens(self) -> int:
        return len(self._k)

    def fused_decode(self, query: torch.Tensor, scaling: float, kv_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of one query token per sequence over this layer's packed storage (Triton)."""
        from .attention import rotated_decode

        if self._k.static is not None:
            return self._static_decode(query, scaling)
        from .kernels.triton_decode import decode_attention

        h, n_q = self._k.held_sink, self._k.num_quantized
        if kv_mask is not None and h:  # sequence order [sink, packed, newest] -> the kernel's [packed, sink, newest]
            kv_mask = torch.cat([kv_mask[:, h:h + n_q], kv_mask[:, :h], kv_mask[:, h + n_q:]], dim=1)

        return rotated_decode(decode_attention, query, self._k.packed, self._k.residual, self._v.packed,
                              self._v.residual, scaling, kv_mask, self.spec.k.rotation, self.spec.v.rotation)

    # ------------------------------------------------------------------ static mode (CUDA graphs)
    def make_static(self, max_tokens: int, state: torch.Tensor, mask: torch.Tensor | None,
                    bump: torch.Tensor | None) -> None:
        """Fixed buffers for ``max_tokens`` stored tokens; ``state`` is this layer's device row
        ``[quantized units, residual tokens after the write, write slot]`` (see
        :meth:`MixedPrecisionCache.make_static`); ``bump`` (last layer only) is advanced after attention."""
        k, v = self.spec.k, self.spec.v
        if not (k.quantized and v.quantized) or self.is_sliding:
            raise PlanError(f"layer {self.layer_idx} ({self.spec.name}, sliding={self.is_sliding}) cannot be static; "
                            "allowed: full-attention layers with quantized keys and values")
        if self._k.unit != self._v.unit or k.residual_length != v.residual_length:
            raise PlanError(f"layer {self.layer_idx}: keys and values flush in different rhythms; allowed: equal "
                            "flush unit and residual_length")
        if not self.is_initialized:
            raise RuntimeError("make_static needs a prefilled cache (run the prompt through the model first)")
        if mask is not None and self._k.sink:
            raise ValueError(f"layer {self.layer_idx}: a padded batch cannot be made static with sink_length="
                             f"{self._k.sink} (the kernel reads sink tokens after the packed ones, and the static "
                             "mask is indexed by position); allowed: an unpadded batch, or the dynamic cache")
        like = torch.empty(self.batch_size, self.num_kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
        self._k.make_static(max_tokens, like)
        self._v.make_static(max_tokens, like)
        self._lens, self._slot, self._mask, self._bump = state[0:2], state[2:3], mask, bump
        self.fused_attention = True
        self._qunit = quant.length_unit(self._k._buf)
        self._flush_delta = torch.tensor([self._k.unit // self._qunit, -self._k.unit, -self._k.unit],
                                         device=state.device)

    def static_row(self) -> list[int]:
        """The host's view of this layer's device state row before the next step."""
        n_r = self._k.num_residual
        return [self._k.num_quantized // self._qunit, n_r + 1, n_r]

    def _static_decode(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        from .attention import decode_attention as reference
        from .attention import rotated_decode

        if kernels.use_triton(query.device):
            from .kernels.triton_decode import decode_attention
        else:
            decode_attention = reference
        out = rotated_decode(decode_attention, query, self._k._buf, self._k.static, self._v._buf, self._v.static,
                             scaling, self._mask, self.spec.k.rotation, self.spec.v.rotation, lengths=self._lens)
        if self._bump is not None:  # every layer has attended: the written slot now counts
            self._bump.add_(1)
        return out

    def _evict(self) -> None:
        # Mirrors DynamicSlidingWindowLayer (keep window - 1 tokens) but only drops whole key groups.
        unit = self._k.unit if self._k.granularity == "per_channel" else 1
        new_start = max(0, (self.cumulative_length - self.sliding_window + 1) // unit * unit)
        if new_start > self.start:
            self._k.drop_front(new_start - self.start)
            self._v.drop_front(new_start - self.start)
            self.start = new_start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length - self.start + query_length, self.start

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (negative), or keep the first ``n`` (positive)."""
        n = -tokens_to_remove if tokens_to_remove <= 0 else max(0, self.cumulative_length - tokens_to_remove)
        if n == 0 or not self.is_initialized:
            return
        if self.start > 0:
            raise RuntimeError(f"layer {self.layer_idx}: cannot crop a sliding-window layer whose oldest tokens "
                               "were already evicted")
        if n > self.cumulative_length:
            raise ValueError(f"crop({tokens_to_remove}) removes {n} tokens; allowed: at most "
                             f"{self.cumulative_length} (the cached length)")
        self._k.drop_back(n)
        self._v.drop_back(n)
        self.cumulative_length -= n

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._k.map(fn)
        self._v.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.cumulative_length:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.cumulative_length:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))
            self.batch_size *= repeats

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.cumulative_length:
            self._map(lambda t: t[indices, ...])
            self.batch_size = self._k.residual.shape[0]

    def offload(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    # ------------------------------------------------------------------ kvtuner additions
    def nbytes(self) -> int:
        """Bytes really held: packed codes + scales/zeros + residual, keys and values."""
        return self._k.nbytes() + self._v.nbytes()

    def reserved_nbytes(self) -> int:
        """Bytes allocated, spare buffer capacity included."""
        return self._k.reserved_nbytes() + self._v.reserved_nbytes()

    def token_counts(self) -> dict[str, tuple[int, int]]:
        """``{"key": (quantized, full_precision), "value": (...)}`` stored tokens."""
        return {"key": (self._k.num_quantized, self._k.num_residual),
                "value": (self._v.num_quantized, self._v.num_residual)}


class MixedPrecisionCache(Cache):
    """A ``transformers.Cache`` with a (key bits, value bits) pair per layer, from a :class:`KVPlan`.

    On a CUDA device (backend ``"auto"`` or ``"triton"``, see :func:`kvtuner.set_backend`) the cache
    quantizes with Triton kernels and, during decode, hands attention to the fused kernel that reads
    the packed storage: at the first update it selects the registered ``"kvtuner"`` attention
    function in ``config`` (SDPA for prefill, the fused kernel for one-token steps) when the model
    uses ``"sdpa"`` or ``"eager"``. On CPU the reference path runs.

    Args:
        plan: a :class:`KVPlan` or the path of a plan file.
        config: the model's config (``model.config``); the plan is validated against it.
        max_cache_len: tokens to reserve packed storage for up front (optional; otherwise buffers
            grow geometrically).
    """

    def __init__(self, plan: KVPlan | str | os.PathLike[str], config: Any, max_cache_len: int | None = None):
        if not isinstance(plan, KVPlan):
            plan = KVPlan.load(plan)
        dims = plan.check_config(config)
        layers = [QuantizedKVLayer(spec, num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim, layer_idx=i,
                                   sliding_window=dims.sliding_window if kind == "sliding_attention" else None,
                                   capacity=max_cache_len)
                  for i, (spec, kind) in enumerate(zip(plan.layers, dims.layer_types))]
        super().__init__(layers=layers)
        self.plan, self.dims, self.config = plan, dims, config

    @classmethod
    def from_plan(cls, config: Any, plan: KVPlan | str | os.PathLike[str]) -> MixedPrecisionCache:
        return cls(plan, config)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise PlanError(f"layer_idx={layer_idx} is outside this cache; allowed: 0..{len(self.layers) - 1} "
                            "(the cache was built for a model with another layer count)")
        if layer_idx == 0 and not self.layers[0].is_initialized:
            self._select_attention(key_states.device)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _select_attention(self, device: torch.device) -> None:
        from .attention import ATTN_NAME, register

        impl = getattr(self.config, "_attn_implementation", None)
        fused = kernels.use_triton(device) and impl in ("sdpa", "eager", ATTN_NAME)
        if fused and impl != ATTN_NAME:
            self.config._attn_implementation = register()
        for layer in self.layers:
            layer.fused_attention = fused

    # ------------------------------------------------------------------ static mode (CUDA graphs)
    def make_static(self, max_len: int, attention_mask: torch.Tensor | None = None) -> None:
        """Move a prefilled cache into fixed buffers for ``max_len`` tokens in all (prompt included),
        so that a decode step can be captured in a CUDA graph and replayed
        (:func:`kvtuner.generation.greedy_generate` does this).

        Each step then writes its token into a fixed residual slot and the kernel reads the counts
        from a device tensor; the caller runs :meth:`before_step` (the flushes that are due, eagerly)
        and :meth:`after_step` (host bookkeeping) around every step. ``attention_mask`` is the
        prompt's ``[B, P]`` padding mask. Every layer must be a full-attention layer with quantized
        keys and values; ``generate()``, cropping and beam reordering are not available afterwards.
        """
        first = self.layers[0]
        if not first.is_initialized:
            raise RuntimeError("make_static needs a prefilled cache (run the prompt through the model first)")
        if max_len < self.get_seq_length() + 1:
            raise ValueError(f"max_len={max_len} is invalid; allowed: more than the {self.get_seq_length()} "
                             "tokens already cached")
        from .attention import ATTN_NAME, register

        impl = getattr(self.config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager", ATTN_NAME):
            raise ValueError(f"attention implementation {impl!r} cannot read a static cache; allowed: 'sdpa', "
                             f"'eager' or {ATTN_NAME!r}")
        self.config._attn_implementation = register()
        dev = first.device
        self._state = torch.zeros(len(self.layers), 3, dtype=torch.int64, device=dev)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            b, p = attention_mask.shape
            mask = torch.ones(b, max_len, dtype=torch.uint8 if dev.type == "cuda" else torch.bool, device=dev)
            mask[:, :p] = attention_mask.to(dev) != 0
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer.make_static(max_len, self._state[i], mask, self._state[:, 1:] if i == last else None)
        self._state.copy_(torch.tensor([layer.static_row() for layer in self.layers]))
        self.static_max_len = max_len

    static_max_len: int | None = None

    @property
    def is_static(self) -> bool:
        return self.static_max_len is not None

    def reset(self) -> None:
        super().reset()
        self.static_max_len = None

    def before_step(self) -> None:
        """Static mode, before each decode step: run the flushes that are due (eager kernels)."""
        for i, layer in enumerate(self.layers):
            if layer.cumulative_length + 1 > self.static_max_len:
                raise RuntimeError(f"static cache full: {self.static_max_len} tokens (make_static's max_len)")
            if layer._k.static_flush_due():
                layer._k.static_flush()
                layer._v.static_flush()
                self._state[i].add_(layer._flush_delta)

    def after_step(self) -> None:
        """Static mode, after each decode step: count the token the device wrote in every layer."""
        for layer in self.layers:
            layer._k.static_count(1)
            layer._v.static_count(1)
            layer.cumulative_length += 1

    def reserved_nbytes(self) -> int:
        """Bytes allocated by all layers, spare buffer capacity included."""
        return sum(layer.reserved_nbytes() for layer in self.layers)

    def nbytes(self) -> int:
        """Bytes really held by all layers (codes + scales/zeros + residual)."""
        return sum(layer.nbytes() for layer in self.layers)

    def __repr__(self) -> str:
        return (f"MixedPrecisionCache({self.plan.num_layers} layers, {self.plan.equivalent_bits:.2f} equivalent "
                f"bits, {self.get_seq_length()} tokens, {self.nbytes()} bytes)")


# Values in token blocks (quant.to_token_blocks) on the Triton path. None: where measured faster on an
# H100 (benchmarks/results/kernel_experiments_h100.md, session 11): KIVI values of 2-4 bits with a
# 128-token group (one block per 128-token tile: KV4 197 -> 184 µs, K4V2 199 -> 181, KV2 214 -> 187
# per layer at 64 x 4k). With 32-token groups they were slower (K4V2 351 -> 380, KV2 361 -> 524,
# K4V3 434 -> 674 µs; end to end K4V2 54.9 -> 65.0 ms/step), and 8-bit values were slower at any
# group. True/False force the layout wherever it is possible (tests, A/B runs).
VALUE_TOKEN_BLOCKS: bool | None = None
TOKEN_BLOCK_BITS = (2, 3, 4)
FAST_TOKEN_BLOCKS = (128,)  # groups (flush units) at which the fused kernel reads token blocks faster


def value_token_block(spec: QuantSpec, role: str, head_dim: int, device: torch.device) -> int:
    """Tokens per block in which a store keeps its packed codes (0: packed along head_dim).

    Possible for KIVI values of 2-4 bits whose flush unit (the group) is a multiple of 32 tokens:
    one block per flush unit. Chosen automatically on the fused-kernel path for the groups in
    ``FAST_TOKEN_BLOCKS``; everything else, and the CPU reference path, keeps codes packed along
    head_dim (same bytes either way).
    """
    unit = spec.flush_unit(role)
    possible = (role == "value" and spec.mode == "kivi" and spec.bits in TOKEN_BLOCK_BITS and unit % 32 == 0
                and head_dim % 8 == 0)
    if VALUE_TOKEN_BLOCKS is None:
        wanted = unit in FAST_TOKEN_BLOCKS and kernels.use_triton(device)
    else:
        wanted = VALUE_TOKEN_BLOCKS
    return unit if possible and wanted else 0


# 3-bit codes packed along head_dim as contiguous 24-bit words (quant.to_channel_words, 3 bits): keys, and values
# not in token blocks, read with one mask and one packed FMA per 2 codes instead of two planes' four. None: on
# the fused-kernel path, where measured faster on an H100 (benchmarks/results/kernel_experiments_h100.md,
# session 21; graph µs at 64 x 4k, G = 32: K3V3 238 -> 225, K3V2 223 -> 219, K3V4 216 -> 211, K4V3 212 -> 207;
# G = 128 token-blocked values, 3-bit keys: K3V2 196 -> 185, K3V3 206 -> 197). The CPU reference path keeps the
# planes (same bytes either way). True/False force the layout wherever it is possible (tests, A/B runs).
WORDS3: bool | None = None


def channel_words(spec: QuantSpec, value_spec: QuantSpec | None, role: str, head_dim: int,
                  device: torch.device) -> bool:
    """Whether a store keeps its codes in channel word order (``quant.to_channel_words``).

    4-bit keys next to token-blocked values: the fused kernel then skips the fp16-pair repacking of
    the key tile (H100, 64 x 4k: K4V4 184 -> 176 µs, K4V2 180 -> 174). Not for 2-bit keys (50-60 %
    slower: more registers) nor for 4-bit keys next to values packed along head_dim (K4V8 262 -> 286).
    3-bit codes (keys, and values not in token blocks): contiguous words on the fused-kernel path (:data:`WORDS3`)
    (the plane word order of session 12 was 50 % slower and is gone).
    """
    if spec.bits not in (3, 4) or head_dim % quant.word_channels(spec.bits):  # the only widths kept in word order
        return False
    if spec.bits == 3:
        wanted = kernels.use_triton(device) if WORDS3 is None else WORDS3
        return wanted and (role == "key" or value_token_block(spec, role, head_dim, device) == 0)
    return (role == "key" and value_spec is not None
            and value_token_block(value_spec, "value", head_dim, device) > 0)


def _quantize(x: torch.Tensor, bits: int, granularity: str, group: int) -> quant.QuantizedTensor:
    if kernels.use_triton(x.device):
        from .kernels import triton_quant

        return triton_quant.quantize(x, bits, granularity, group)
    return quant.quantize(x, bits, granularity, group)


def simulate_cache(x: torch.Tensor, spec: QuantSpec, role: str) -> torch.Tensor:
    """What attention sees after ``x`` ``[B, H, T, D]`` is written to a cache layer in one prefill.

    Runs the cache's own storage rules (residual window, whole flush units, groups), so offline
    profiling measures exactly the quantization the online cache applies.
    """
    store = _TensorStore(spec, role, x.shape[-1])
    store.append(x)
    return store.materialize(x.dtype)
