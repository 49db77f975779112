"""Packed history plus a full-precision residual: the storage of one layer's keys or values.

The packing itself (codes, scales, zeros, layouts) is ``quant``'s; this module decides *when* tokens are
quantized (whole flush units, after the residual window and the sink tokens) and where they go.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import quant
from .policy import LayerLayout
from .spec import QuantSpec


class TensorStore:
    """Packed history plus full-precision residual for the keys *or* the values of one layer.

    Packed storage lives in buffers with spare capacity that grow geometrically (or are sized once
    from ``capacity``), so a flush writes only the new block in place instead of copying the whole
    history as ``torch.cat`` would. ``packed`` is a view of the filled part.
    """

    def __init__(self, spec: QuantSpec, role: str, head_dim: int, capacity: int | None = None,
                 sliding: bool = False, rounding: tuple | None = None):
        self.spec, self.role, self.head_dim = spec, role, head_dim
        # (KeyRounding, layer): query-aware codes (kvtuner.rounding); they apply to quantized keys only
        self.rounding = rounding if role == "key" and spec.quantized else None
        self.sink = spec.kept_sink(sliding)  # full-precision attention-sink tokens at the residual's front
        self.triton = False  # quantize with the Triton kernel (set_layout)
        self.granularity = spec.granularity(role)
        self.group = spec.group_size if self.granularity == "per_channel" else spec.channel_group(head_dim)
        self.unit = spec.flush_unit(role)
        self.capacity = capacity
        self.token_block, self.channel_words, self.token_pairs = 0, False, False  # set_layout
        self._buf: quant.QuantizedTensor | None = None
        self._n = 0
        self.residual: torch.Tensor | None = None

    def set_layout(self, layout: LayerLayout) -> None:
        """Quantize and lay out codes as the layer's ``layout`` says for this store's role; fixed once
        anything is packed."""
        if self._buf is not None:
            raise RuntimeError("set_layout after the first flush; allowed: before anything is packed")
        key = self.role == "key"
        self.triton = layout.triton
        self.token_block = 0 if key else layout.value_block
        self.channel_words = layout.key_words if key else layout.value_words
        self.token_pairs = not key and layout.value_pairs

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
        if self.channel_words:
            block = quant.in_channel_words(block)
        if self.token_block:
            block = quant.in_token_blocks(block, self.token_block)
        if self.token_pairs:
            block = quant.in_token_pairs(block)
        n, m = self._n, block.num_tokens
        cap = 0 if self._buf is None else self._buf.num_tokens
        if n + m > cap:
            if self.static is not None:  # a captured graph holds the buffer's address
                raise RuntimeError(f"static cache full: {n + m} quantized tokens > capacity {cap}; allowed: at most "
                                   "the max_len given to make_static")
            self._reserve(max(n + m, 2 * cap, 256, self.capacity or 0), block)
        self._copy_in(block, n)
        self._n = n + m

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
                                          self.token_block, self.channel_words, self.token_pairs)
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
            template = self._quantize(like.new_zeros(b, h, self.unit, d))
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
        self._write(self._quantize(self.static[..., s:s + u, :]))
        self.static[..., s:n - u, :].copy_(self.static[..., s + u:n, :].clone())
        self.residual = self.static[..., : n - u, :]

    def static_count(self, added: int) -> None:
        """Host bookkeeping for ``added`` decode tokens the device already wrote."""
        self.residual = self.static[..., : self.num_residual + added, :]

    def _quantize(self, x: torch.Tensor) -> quant.QuantizedTensor:
        if self.spec.rotation:  # only the packed history is rotated: one product per flush, not per step
            x = quant.rotate(x)
        if self.rounding is not None:
            from .rounding import quantize_keys

            rounding, layer = self.rounding
            factor = rounding.factor(layer, self.spec.rotation, x.device)
            return quantize_keys(x, self.spec.bits, self.granularity, self.group, factor, triton=self.triton)
        if self.triton:
            from .kernels import quantize

            return quantize(x, self.spec.bits, self.granularity, self.group)
        return quant.quantize(x, self.spec.bits, self.granularity, self.group)

    def _copy_in(self, block: quant.QuantizedTensor, at: int) -> None:
        m, r0 = block.num_tokens, self._meta_rows(at)
        self._buf.codes[..., at:at + m, :].copy_(block.codes)
        self._buf.scale[..., r0:r0 + block.scale.shape[-2], :].copy_(block.scale)
        self._buf.zero[..., r0:r0 + block.zero.shape[-2], :].copy_(block.zero)

    def append(self, x: torch.Tensor) -> None:
        self.residual = x if self.residual is None else torch.cat([self.residual, x], dim=-2)
        if not self.spec.quantized:
            return
        s = self.sink
        n = max(0, (self.num_residual - s - self.spec.residual_length) // self.unit * self.unit)
        if n:
            self._write(self._quantize(self.residual[..., s:s + n, :]))
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
        h, res = self.held_sink, self.residual
        out = quant.materialize(self.packed, None if res is None else res[..., h:, :], dtype, self.spec.rotation)
        return torch.cat([res[..., :h, :].to(dtype), out], dim=-2) if h else out

    def drop_front(self, n: int) -> None:
        """Forget the ``n`` oldest tokens (per-channel stores: ``n`` is a multiple of the group)."""
        k = min(n, self.num_quantized)
        if k:
            self.packed = None if k == self.num_quantized else quant.slice_tokens(self.packed, k, self.num_quantized)
        if n > k:
            self.residual = self.residual[..., n - k:, :]

    def drop_back(self, n: int, settle: bool = True) -> None:
        """Forget the ``n`` newest tokens, then (``settle``) hold what a fresh store of the remaining
        length holds.

        Packed tokens past a fresh store's split (``QuantSpec.split``), and the surviving part of a
        per-channel key group (or token block) the cut falls into, are dequantized back into the
        residual: they keep the values attention already saw and are quantized again at the next
        flush, the one case where a token is quantized twice. Token counts and bytes then equal a
        fresh prefill's; values differ from one by those tokens' quantization error. Sink tokens go
        last, after every packed token.
        """
        h = self.held_sink
        k = min(n, self.num_residual - h)
        if k:
            self.residual = self.residual[..., : self.num_residual - k, :]
        m = n - k
        if m >= self.num_quantized and m:  # every packed token, then sink tokens from the newest
            self.residual = self.residual[..., : h - (m - self.num_quantized), :]
            self.packed = None
            return
        keep = self.num_quantized - m
        fresh = self.spec.split(self.role, len(self) - m)[0] if settle else keep
        whole = self.granularity == "per_channel" or self.token_block  # stored in whole units
        cut = min(keep // self.unit * self.unit if whole else keep, fresh)
        if cut == self.num_quantized:
            return
        tail = quant.materialize(quant.slice_tokens(self.packed, cut, self.num_quantized), None,
                                 self.residual.dtype, self.spec.rotation)[..., : keep - cut, :]
        self.packed = quant.slice_tokens(self.packed, 0, cut) if cut else None
        res = self.residual  # sequence order [sink, packed, newest]: the tail goes between sink and newest
        self.residual = torch.cat([res[..., :h, :], tail, res[..., h:, :]], dim=-2)

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
