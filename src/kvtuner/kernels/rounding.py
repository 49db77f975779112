"""Triton query-aware key quantization: :func:`kvtuner.rounding.quantize_keys` in one launch.

One program takes one block of tokens of one (sequence, KV head), so every row shares one factor ``U``:
it computes the min/max grid (scales and zeros exactly as :func:`kvtuner.kernels.quantize.quantize`),
rounds the channels in blocks of ``BS``, serially inside a block, then passes the block's errors on to
all later channels at once with one matrix product (``err_block @ U[block, later]``, the lazy-batch update
GPTQ uses), and packs the codes, bit planes included. A flush of the cache's keys is one launch.

Codes equal the reference's except where the changed summation order or fused multiply-adds move a value
across a rounding tie (tests bound how often and by how much).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quant
from ..spec import PLANE_WIDTHS
from .quantize import _LIMITS, _TL, _pack_store, _qparams, _rint, supported


@triton.jit
def _pick(x3, sel):
    """The slice of ``x3`` ``[R, NB, BS]`` that ``sel`` ``[NB]`` marks: ``[R, BS]``."""
    return tl.sum(tl.where(sel[None, :, None], x3, 0.0), axis=1)


@triton.jit
def _quant_round_kernel(X, F, C, S, Z, T, H, stride_c, D: tl.constexpr, TB: tl.constexpr, G: tl.constexpr,
                        PER_CHANNEL: tl.constexpr, BS: tl.constexpr, BITS: tl.constexpr, W0: tl.constexpr,
                        W1: tl.constexpr, EPS: tl.constexpr, TINY: tl.constexpr, OUT: tl.constexpr):
    NB: tl.constexpr = D // BS
    n = tl.program_id(0).to(tl.int64)  # sequence * H + head
    t = tl.program_id(1) * TB + tl.arange(0, TB)
    tmask = t < T
    d = tl.arange(0, D)
    rows = n * T + t
    x = tl.load(X + rows[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    if PER_CHANNEL:  # one group of TB == G tokens per channel
        scale, zero = _qparams(tl.min(x, axis=0), tl.max(x, axis=0), BITS, EPS, TINY, OUT)
        s = tl.broadcast_to(scale.to(tl.float32)[None, :], (TB, D))
        z = tl.broadcast_to(zero.to(tl.float32)[None, :], (TB, D))
        tl.store(S + (n * (T // G) + tl.program_id(1)) * D + d, scale)
        tl.store(Z + (n * (T // G) + tl.program_id(1)) * D + d, zero)
    else:  # groups of G channels per token
        NG: tl.constexpr = D // G
        xg = tl.reshape(x, (TB, NG, G))
        scale, zero = _qparams(tl.min(xg, axis=2), tl.max(xg, axis=2), BITS, EPS, TINY, OUT)
        s = tl.reshape(tl.broadcast_to(scale.to(tl.float32)[:, :, None], (TB, NG, G)), (TB, D))
        z = tl.reshape(tl.broadcast_to(zero.to(tl.float32)[:, :, None], (TB, NG, G)), (TB, D))
        j = tl.arange(0, NG)
        tl.store(S + rows[:, None] * NG + j[None, :], scale, mask=tmask[:, None])
        tl.store(Z + rows[:, None] * NG + j[None, :], zero, mask=tmask[:, None])
    fh = F + (n % H) * (D * D)
    s3 = tl.reshape(s, (TB, NB, BS))
    z3 = tl.reshape(z, (TB, NB, BS))
    blocks = tl.arange(0, NB)
    bi = tl.arange(0, BS)
    codes = tl.zeros((TB, NB, BS), tl.float32)
    w = x
    for j in tl.static_range(NB):
        sel = blocks == j
        wb = _pick(tl.reshape(w, (TB, NB, BS)), sel)
        sb = _pick(s3, sel)
        zb = _pick(z3, sel)
        cb = tl.zeros((TB, BS), tl.float32)
        eb = tl.zeros((TB, BS), tl.float32)
        for c in range(BS):
            one = bi[None, :] == c
            wc = tl.sum(tl.where(one, wb, 0.0), axis=1)
            sc = tl.sum(tl.where(one, sb, 0.0), axis=1)
            zc = tl.sum(tl.where(one, zb, 0.0), axis=1)
            q = tl.where(sc > 0, _rint(tl.math.div_rn(wc - zc, tl.where(sc > 0, sc, 1.0))), 0.0)
            q = tl.minimum(tl.maximum(q, 0.0), 2.0**BITS - 1.0)
            ch = j * BS + c
            err = tl.math.div_rn(wc - (q * sc + zc), tl.load(fh + ch * (D + 1)))
            cb = tl.where(one, q[:, None], cb)
            eb = tl.where(one, err[:, None], eb)
            frow = tl.load(fh + ch * D + j * BS + bi, mask=bi > c, other=0.0)
            wb = wb - err[:, None] * frow[None, :]
        codes = tl.where(sel[None, :, None], cb[:, None, :], codes)
        if j + 1 < NB:  # the block's errors reach every later channel in one product
            later = d[None, :] >= (j + 1) * BS
            fblk = tl.load(fh + (j * BS + bi)[:, None] * D + d[None, :], mask=later, other=0.0)
            w = w - tl.dot(eb, fblk, input_precision="ieee")
    q = tl.reshape(codes, (TB, D)).to(tl.int32)
    if W1 == 0:
        _pack_store(C, q, rows, tmask, stride_c, D, W0, TB)
    else:  # bit planes, low bits first, each packed whole bytes after the previous plane's
        _pack_store(C, q & ((1 << W0) - 1), rows, tmask, stride_c, D, W0, TB)
        _pack_store(C + D * W0 // 8, q >> W0, rows, tmask, stride_c, D, W1, TB)


def fused_supported(x: torch.Tensor, bits: int, granularity: str, group_size: int | None) -> bool:
    """Shapes the kernel covers: 16 <= head_dim <= 256 and what the Triton quantize kernel takes."""
    return x.dim() == 4 and bits in PLANE_WIDTHS and 16 <= x.shape[-1] <= 256 and supported(x, granularity, group_size)


def quantize_keys(x: torch.Tensor, bits: int, granularity: str, group_size: int | None, factor: torch.Tensor
                  ) -> quant.QuantizedTensor:
    """Triton :func:`kvtuner.rounding.quantize_keys` for ``[B, H, T, D]`` keys (``factor`` ``[H, D, D]``);
    shapes it does not cover go to the reference."""
    from .. import rounding

    if not fused_supported(x, bits, granularity, group_size):
        return rounding.quantize_keys(x, bits, granularity, group_size, factor)
    meta = quant.meta_dtype(x.dtype)  # the reference's metadata dtype
    b, h, t, d = x.shape
    x = x.contiguous()
    eps, tiny = _LIMITS.get(meta, (0.0, 0.0))
    width = quant.packed_width(d, bits)
    codes = torch.empty(b, h, t, width, device=x.device, dtype=torch.uint8)
    planes = PLANE_WIDTHS[bits]
    if granularity == "per_channel":
        g = t if group_size is None else group_size
        scale = torch.empty(b, h, t // g, d, device=x.device, dtype=meta)
        tb = g
    else:
        g = d if group_size is None else group_size
        scale = torch.empty(b, h, t, d // g, device=x.device, dtype=meta)
        tb = 16
    zero = torch.empty_like(scale)
    _quant_round_kernel[(b * h, triton.cdiv(t, tb))](
        x, factor.to(device=x.device, dtype=torch.float32).contiguous(), codes, scale, zero, t, h, width, D=d, TB=tb,
        G=g, PER_CHANNEL=granularity == "per_channel", BS=16, BITS=bits, W0=planes[0],
        W1=planes[1] if len(planes) > 1 else 0, EPS=eps, TINY=tiny, OUT=_TL[meta])
    return quant.QuantizedTensor(codes, scale, zero, bits, granularity, g, d)
