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

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import quant
from .policy import DEFAULT_POLICY, KernelPolicy, LayerLayout
from .spec import KVPlan, LayerSpec, PlanError, QuantSpec
from .store import TensorStore


class QuantizedKVLayer(CacheLayerMixin):
    """One decoder layer's cache: keys and values each with their own :class:`QuantSpec`.

    Args:
        spec: the layer's (k, v) specs.
        num_kv_heads, head_dim: the shape the model will hand to ``update``; other shapes are an
            error (a cache used with the wrong model).
        layer_idx: for error messages.
        policy: backend and storage layouts; the layer asks it once, at its first update.
        sliding_window: set for sliding-window attention layers; tokens older than the window are
            dropped, in whole key groups for KIVI keys (the mask is told via ``get_mask_sizes``).
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, spec: LayerSpec, *, num_kv_heads: int, head_dim: int, layer_idx: int = 0,
                 sliding_window: int | None = None, capacity: int | None = None,
                 policy: KernelPolicy = DEFAULT_POLICY, key_rounding: Any = None):
        super().__init__()
        self.key_rounding = key_rounding  # kvtuner.rounding.KeyRounding of the whole plan, or None
        self.policy = policy
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
        self._clear()

    def _clear(self) -> None:
        sliding = self.is_sliding
        rounding = None if self.key_rounding is None else (self.key_rounding, self.layer_idx)
        self._k = TensorStore(self.spec.k, "key", self.head_dim, self.capacity, sliding=sliding, rounding=rounding)
        self._v = TensorStore(self.spec.v, "value", self.head_dim, self.capacity, sliding=sliding)
        self.layout: LayerLayout | None = None  # decided at the first update, from the device
        self.cumulative_length = 0  # tokens seen
        self.start = 0  # absolute position of the oldest stored token (> 0 only for sliding layers)
        self.record_past = False
        self.is_initialized = False

    def __repr__(self) -> str:
        return f"QuantizedKVLayer({self.spec.name}, {self.spec.k.mode}, sliding={self.sliding_window})"

    # ------------------------------------------------------------------ CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.layout is None:
            self.layout = self.policy.layout(self.spec.k, self.spec.v, self.head_dim, self.device)
            self._k.set_layout(self.layout)
            self._v.set_layout(self.layout)
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
                and self._k.num_quantized == self._v.num_quantized and self.layout.triton)

    def stored_tokens(self) -> int:
        return len(self._k)

    def fused_decode(self, query: torch.Tensor, scaling: float, kv_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of one query token per sequence over this layer's packed storage (Triton)."""
        from .attention import rotated_decode

        if self._k.static is not None:
            return self._static_decode(query, scaling)
        decode_attention = self._kernel(self._k.packed)
        h, n_q = self._k.held_sink, self._k.num_quantized
        if kv_mask is not None and h:  # sequence order [sink, packed, newest] -> the kernel's [packed, sink, newest]
            kv_mask = torch.cat([kv_mask[:, h:h + n_q], kv_mask[:, :h], kv_mask[:, h + n_q:]], dim=1)

        return rotated_decode(decode_attention, query, self._k.packed, self._k.residual, self._v.packed,
                              self._v.residual, scaling, kv_mask, self.spec.k.rotation, self.spec.v.rotation)

    def _kernel(self, packed: quant.QuantizedTensor | None) -> Any:
        """The decode kernel for this layer: the Gluon one where the layout chose it and there is packed
        history to read (with the policy's ``decode_stages``), else the Triton one."""
        if self.layout.gluon and packed is not None and packed.num_tokens:
            from .kernels.gluon_decode import decode_attention, ring_stages

            stages = ring_stages(self.policy.decode_stages, self.spec.k.bits, self.spec.v.bits)
            kernel = functools.partial(decode_attention, stages=stages)
            kernel.fuses_rotation = decode_attention.fuses_rotation
            return kernel
        from .kernels import decode_attention

        return decode_attention

    # ------------------------------------------------------------------ static mode (CUDA graphs)
    def make_static(self, max_tokens: int, state: torch.Tensor, mask: torch.Tensor | None,
                    bump: torch.Tensor | None) -> None:
        """Fixed buffers for ``max_tokens`` stored tokens; ``state`` is this layer's device row
        ``[quantized units, residual tokens after the write, write slot]`` (see
        :meth:`MixedPrecisionCache.make_static`); ``bump`` (last layer only) is advanced after attention."""
        k, v = self.spec.k, self.spec.v
        if not (k.quantized and v.quantized) or self.is_sliding:
            raise PlanError(f"layer {self.layer_idx} ({self.spec.name}, sliding={self.is_sliding}) cannot be static; "
                            "allowed: full-attention layers with quantized keys and values (decode this plan eagerly: "
                            "model.generate(..., past_key_values=cache))")
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

        decode_attention = self._kernel(self._k._buf) if self.layout.triton else reference
        out = rotated_decode(decode_attention, query, self._k._buf, self._k.static, self._v._buf, self._v.static,
                             scaling, self._mask, self.spec.k.rotation, self.spec.v.rotation, lengths=self._lens)
        if self._bump is not None:  # every layer has attended: the written slot now counts
            self._bump.add_(1)
        return out

    def _evict(self) -> None:
        new_start = self.spec.window_start(self.cumulative_length, self.sliding_window)
        if new_start > self.start and not self.record_past:
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
        """Drop the newest ``-tokens_to_remove`` tokens (negative), or keep the first ``n`` (positive).

        Afterwards a full-attention layer holds the token counts and bytes of a fresh prefill of that
        length (``TensorStore.drop_back``). A sliding-window layer can give back tokens as long as
        none it would need again was evicted: during assisted decoding transformers turns on
        :meth:`activate_past_recording`, which defers eviction until the next crop.
        """
        n = -tokens_to_remove if tokens_to_remove <= 0 else max(0, self.cumulative_length - tokens_to_remove)
        if not self.is_initialized or (n == 0 and not self.is_sliding):
            return
        if n > self.cumulative_length:
            raise ValueError(f"crop({tokens_to_remove}) removes {n} tokens; allowed: at most "
                             f"{self.cumulative_length} (the cached length)")
        if self.is_sliding and self.spec.window_start(self.cumulative_length - n, self.sliding_window) < self.start:
            raise RuntimeError(f"layer {self.layer_idx}: crop({tokens_to_remove}) needs sliding-window tokens that "
                               "were already evicted; allowed: crops within the tokens added since "
                               "activate_past_recording() (as assisted decoding does)")
        self._k.drop_back(n, settle=not self.is_sliding)
        self._v.drop_back(n, settle=not self.is_sliding)
        self.cumulative_length -= n
        if self.is_sliding:
            self._evict()

    def activate_past_recording(self, **kwargs: Any) -> None:
        """Keep sliding-window tokens past the window until the next :meth:`crop` (transformers calls this
        for assisted decoding, then sets ``record_past = False`` when done)."""
        self.record_past = True

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

    On a CUDA device (``policy.backend`` ``"auto"`` or ``"triton"``, see :class:`kvtuner.KernelPolicy`) the cache
    quantizes with Triton kernels and, during decode, hands attention to the fused kernel that reads
    the packed storage: at the first update it selects the registered ``"kvtuner"`` attention
    function in ``config`` (SDPA for prefill, the fused kernel for one-token steps) when the model
    uses ``"sdpa"`` or ``"eager"``. On CPU the reference path runs.

    Args:
        plan: a :class:`KVPlan` or the path of a plan file.
        config: the model's config (``model.config``); the plan is validated against it.
        max_cache_len: tokens to reserve packed storage for up front (optional; otherwise buffers
            grow geometrically).
        policy: backend and storage layouts (:class:`kvtuner.KernelPolicy`; default: all ``"auto"``).
    """

    def __init__(self, plan: KVPlan | str | os.PathLike[str], config: Any, max_cache_len: int | None = None,
                 policy: KernelPolicy = DEFAULT_POLICY):
        if not isinstance(plan, KVPlan):
            plan = KVPlan.load(plan)
        dims = plan.check_config(config)
        layers = [QuantizedKVLayer(spec, num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim, layer_idx=i,
                                   sliding_window=dims.sliding_window if kind == "sliding_attention" else None,
                                   capacity=max_cache_len, policy=policy, key_rounding=plan.key_rounding)
                  for i, (spec, kind) in enumerate(zip(plan.layers, dims.layer_types))]
        super().__init__(layers=layers)
        self.plan, self.dims, self.config, self.policy = plan, dims, config, policy

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
        fused = self.policy.use_triton(device) and impl in ("sdpa", "eager", ATTN_NAME)
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


def simulate_cache(x: torch.Tensor, spec: QuantSpec, role: str, policy: KernelPolicy = DEFAULT_POLICY,
                   rounding: tuple[Any, int] | None = None) -> torch.Tensor:
    """What attention sees after ``x`` ``[B, H, T, D]`` is written to a cache layer in one prefill.

    Runs the cache's own storage rules (residual window, whole flush units, groups), so offline
    profiling measures exactly the quantization the online cache applies. ``rounding``: keys'
    ``(KeyRounding, layer)`` for query-aware codes, as a plan with ``key_rounding`` stores them.
    """
    store = TensorStore(spec, role, x.shape[-1], rounding=rounding)
    store.set_layout(policy.layout(spec, spec, x.shape[-1], x.device))
    store.append(x)
    return store.materialize(x.dtype)
