"""Quantize + pack on append (Triton); same signature and results as :func:`kvtuner.quant.quantize`.

One program quantizes one group-aligned block: ``ROWS`` tokens x all channels for per-token groups,
or one group of ``G`` tokens x all channels for per-channel (KIVI key) groups. Statistics are fp32,
scale/zero are rounded outward to the storage dtype exactly as the reference does, the division
is IEEE-rounded and ties round to even, so codes, scales and zeros equal the reference's.
Shapes the kernel does not cover (a tail group, head_dim not a power of two) go to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quant

_LIMITS = {torch.float16: (2.0**-10, 2.0**-14), torch.bfloat16: (2.0**-7, 2.0**-126)}
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _to(v, OUT: tl.constexpr):
    """fp32 -> OUT with round-to-nearest-even (done by hand for bf16: not every Triton backend does)."""
    if OUT == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        one = tl.full([1], 1, tl.uint32)
        u = ((u + ((u >> 16) & one) + tl.full([1], 0x7FFF, tl.uint32)) >> 16) << 16
        v = u.to(tl.float32, bitcast=True)
        return v.to(OUT)
    return v.to(OUT, fp_downcast_rounding="rtne")


@triton.jit
def _round_out(v, EPS: tl.constexpr, TINY: tl.constexpr, OUT: tl.constexpr, DOWN: tl.constexpr):
    r = _to(v, OUT)
    if EPS == 0.0:
        return r
    step = tl.maximum(tl.abs(v) * EPS, TINY)
    rf = r.to(tl.float32)
    if DOWN:
        return tl.where(rf > v, _to(v - step, OUT), r)
    return tl.where(rf < v, _to(v + step, OUT), r)


@triton.jit
def _rint(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _saturate(v, OUT: tl.constexpr):
    """As ``quant._saturate``: outward rounding past fp16's largest finite value stops there."""
    if OUT == tl.float16:
        return tl.minimum(tl.maximum(v, -65504.0), 65504.0).to(OUT)
    elif OUT == tl.bfloat16:
        big = 3.3895313892515355e38
        return tl.minimum(tl.maximum(v.to(tl.float32), -big), big).to(OUT)
    else:
        return v


@triton.jit
def _qparams(mn, mx, BITS: tl.constexpr, EPS: tl.constexpr, TINY: tl.constexpr, OUT: tl.constexpr):
    """Stored (scale, zero) from fp32 group min/max, rounded outward as ``quant._qparams_last``."""
    zero = _saturate(_round_out(mn, EPS, TINY, OUT, True), OUT)
    scale = _saturate(_round_out(tl.math.div_rn(mx - zero.to(tl.float32), (2.0**BITS - 1.0) + 0.0 * mx), EPS, TINY,
                                 OUT, False), OUT)
    return scale, zero


@triton.jit
def _codes(x, s, z, BITS: tl.constexpr):
    """int32 codes of fp32 ``x`` for the (same-shaped) fp32 scale ``s`` and zero ``z``."""
    q = tl.where(s > 0, _rint(tl.math.div_rn(x - z, tl.where(s > 0, s, 1.0))), 0.0)
    return tl.minimum(tl.maximum(q, 0.0), 2.0**BITS - 1.0).to(tl.int32)


@triton.jit
def _pack_store(out, codes, rows, row_mask, stride_row, D: tl.constexpr, BITS: tl.constexpr,
                NROWS: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    W: tl.constexpr = D // PER
    if PER == 1:
        packed = codes
    else:
        shifts = tl.arange(0, PER) * BITS
        packed = tl.sum(tl.reshape(codes, (NROWS, W, PER)) << shifts[None, None, :], axis=2)
    w = tl.arange(0, W)
    tl.store(out + rows.to(tl.int64)[:, None] * stride_row + w[None, :], packed.to(tl.uint8),
             mask=row_mask[:, None])


@triton.jit
def _quant_per_token_kernel(X, C, S, Z, n_rows, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                            ROWS: tl.constexpr, EPS: tl.constexpr, TINY: tl.constexpr,
                            OUT: tl.constexpr):
    NG: tl.constexpr = D // G
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    d = tl.arange(0, D)
    x = tl.load(X + rows.to(tl.int64)[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    x = x.to(tl.float32)
    xg = tl.reshape(x, (ROWS, NG, G))
    scale, zero = _qparams(tl.min(xg, axis=2), tl.max(xg, axis=2), BITS, EPS, TINY, OUT)
    sb = tl.broadcast_to(scale.to(tl.float32)[:, :, None], (ROWS, NG, G))
    zb = tl.broadcast_to(zero.to(tl.float32)[:, :, None], (ROWS, NG, G))
    q = _codes(xg, sb, zb, BITS)
    _pack_store(C, tl.reshape(q, (ROWS, D)), rows, rmask, D * BITS // 8, D, BITS, ROWS)
    j = tl.arange(0, NG)
    off = rows.to(tl.int64)[:, None] * NG + j[None, :]
    tl.store(S + off, scale, mask=rmask[:, None])
    tl.store(Z + off, zero, mask=rmask[:, None])


@triton.jit
def _quant_per_channel_kernel(X, C, S, Z, T, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                              EPS: tl.constexpr, TINY: tl.constexpr, OUT: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    n_groups = T // G
    t = g * G + tl.arange(0, G)
    d = tl.arange(0, D)
    x = tl.load(X + (n * T + t)[:, None] * D + d[None, :])
    x = x.to(tl.float32)
    scale, zero = _qparams(tl.min(x, axis=0), tl.max(x, axis=0), BITS, EPS, TINY, OUT)
    sb = tl.broadcast_to(scale.to(tl.float32)[None, :], (G, D))
    zb = tl.broadcast_to(zero.to(tl.float32)[None, :], (G, D))
    q = _codes(x, sb, zb, BITS)
    _pack_store(C, q, n * T + t, t < T, D * BITS // 8, D, BITS, G)
    tl.store(S + (n * n_groups + g) * D + d, scale)
    tl.store(Z + (n * n_groups + g) * D + d, zero)


def supported(x: torch.Tensor, granularity: str, group_size: int | None) -> bool:
    d, t = x.shape[-1], x.shape[-2]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or d & (d - 1) or d < 4 or t == 0:
        return False
    if granularity == "per_token":
        g = d if group_size is None else group_size
        return d % g == 0 and g & (g - 1) == 0
    g = t if group_size is None else group_size
    return t % g == 0 and g & (g - 1) == 0 and 16 <= g <= 256


def quantize(x: torch.Tensor, bits: int, granularity: str = "per_token", group_size: int | None = None,
             meta: torch.dtype | None = None) -> quant.QuantizedTensor:
    """Triton :func:`kvtuner.quant.quantize`; falls back to the reference where unsupported."""
    if bits not in (2, 4, 8) or not supported(x, granularity, group_size):
        return quant.quantize(x, bits, granularity, group_size, meta)
    meta = quant.check_meta(meta, x.dtype)
    *lead, t, d = x.shape
    x = x.contiguous()
    eps, tiny = _LIMITS.get(meta, (0.0, 0.0))
    consts = dict(EPS=eps, TINY=tiny, OUT=_TL[meta])
    codes = torch.empty(*lead, t, d * bits // 8, device=x.device, dtype=torch.uint8)
    if granularity == "per_token":
        g = d if group_size is None else group_size
        scale = torch.empty(*lead, t, d // g, device=x.device, dtype=meta)
        zero = torch.empty_like(scale)
        n_rows = x.numel() // d
        rows = 16
        _quant_per_token_kernel[(triton.cdiv(n_rows, rows),)](x, codes, scale, zero, n_rows, D=d, G=g, BITS=bits,
                                                              ROWS=rows, **consts)
    else:
        g = t if group_size is None else group_size
        scale = torch.empty(*lead, t // g, d, device=x.device, dtype=meta)
        zero = torch.empty_like(scale)
        n = x.numel() // (t * d)
        _quant_per_channel_kernel[(n, t // g)](x, codes, scale, zero, t, D=d, G=g, BITS=bits, **consts)
    return quant.QuantizedTensor(codes, scale, zero, bits, granularity, g, d)
