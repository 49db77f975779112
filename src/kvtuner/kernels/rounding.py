"""Triton query-aware key quantization: :func:`kvtuner.rounding.quantize_keys` in one launch.

One program takes 16 tokens of one (sequence, KV head), so every row shares one factor ``U``: it
computes the min/max grid (scales and zeros exactly as :func:`kvtuner.kernels.quantize.quantize`; for
per-channel groups over the whole group), rounds the channels in blocks of ``BS`` (serially inside a
block, against the block's factor rows held in registers), then passes the block's errors on to all
later channels at once with one matrix product (``err_block @ U[block, later]``, the lazy-batch update
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
def _quant_round_kernel(X, F, C, S, Z, T, H, stride_c, D: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr,
                        PER_CHANNEL: tl.constexpr, BS: tl.constexpr, BITS: tl.constexpr, W0: tl.constexpr,
                        W1: tl.constexpr, EPS: tl.constexpr, TINY: tl.constexpr, OUT: tl.constexpr):
    NB: tl.constexpr = D // BS
    n = tl.program_id(0).to(tl.int64)  # sequence * H + head
    t = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    tmask = t < T
    d = tl.arange(0, D)
    rows = n * T + t
    x = tl.load(X + rows[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    blocks = tl.arange(0, NB)
    bi = tl.arange(0, BS)
    if PER_CHANNEL:  # ROWS divides G: statistics over the whole group that holds these rows
        grp = tl.program_id(1) * ROWS // G
        tg = grp * G + tl.arange(0, G)
        xg = tl.load(X + (n * T + tg)[:, None] * D + d[None, :]).to(tl.float32)
        scale, zero = _qparams(tl.min(xg, axis=0), tl.max(xg, axis=0), BITS, EPS, TINY, OUT)
        if (tl.program_id(1) * ROWS) % G == 0:
            tl.store(S + (n * (T // G) + grp) * D + d, scale)
            tl.store(Z + (n * (T // G) + grp) * D + d, zero)
        s3 = tl.reshape(scale.to(tl.float32), (NB, BS))
        z3 = tl.reshape(zero.to(tl.float32), (NB, BS))
    else:  # groups of G channels per token
        NG: tl.constexpr = D // G
        xr = tl.reshape(x, (ROWS, NG, G))
        scale, zero = _qparams(tl.min(xr, axis=2), tl.max(xr, axis=2), BITS, EPS, TINY, OUT)
        j = tl.arange(0, NG)
        tl.store(S + rows[:, None] * NG + j[None, :], scale, mask=tmask[:, None])
        tl.store(Z + rows[:, None] * NG + j[None, :], zero, mask=tmask[:, None])
        s3 = tl.reshape(tl.broadcast_to(scale.to(tl.float32)[:, :, None], (ROWS, NG, G)), (ROWS, NB, BS))
        z3 = tl.reshape(tl.broadcast_to(zero.to(tl.float32)[:, :, None], (ROWS, NG, G)), (ROWS, NB, BS))
    fh = F + (n % H) * (D * D)
    eye = bi[:, None] == bi[None, :]
    codes = tl.zeros((ROWS, NB, BS), tl.float32)
    w = x
    for j in tl.static_range(NB):
        sel = blocks == j
        wb = _pick(tl.reshape(w, (ROWS, NB, BS)), sel)
        if PER_CHANNEL:
            sb = tl.sum(tl.where(sel[:, None], s3, 0.0), axis=0)  # [BS]: one grid for every row
            zb = tl.sum(tl.where(sel[:, None], z3, 0.0), axis=0)
        else:
            sb = _pick(s3, sel)
            zb = _pick(z3, sel)
        # the block's own factor rows, loaded once: the serial loop below waits on no memory
        fb = tl.load(fh + (j * BS + bi)[:, None] * D + j * BS + bi[None, :])
        diag = tl.sum(tl.where(eye, fb, 0.0), axis=1)
        cb = tl.zeros((ROWS, BS), tl.float32)
        eb = tl.zeros((ROWS, BS), tl.float32)
        for c in tl.static_range(BS):
            one = bi == c
            wc = tl.sum(tl.where(one[None, :], wb, 0.0), axis=1)
            if PER_CHANNEL:
                sc = tl.sum(tl.where(one, sb, 0.0), axis=0)
                zc = tl.sum(tl.where(one, zb, 0.0), axis=0)
            else:
                sc = tl.sum(tl.where(one[None, :], sb, 0.0), axis=1)
                zc = tl.sum(tl.where(one[None, :], zb, 0.0), axis=1)
            q = tl.where(sc > 0, _rint(tl.math.div_rn(wc - zc, tl.where(sc > 0, sc, 1.0))), 0.0)
            q = tl.minimum(tl.maximum(q, 0.0), 2.0**BITS - 1.0)
            err = tl.math.div_rn(wc - (q * sc + zc), tl.sum(tl.where(one, diag, 0.0), axis=0))
            cb = tl.where(one[None, :], q[:, None], cb)
            eb = tl.where(one[None, :], err[:, None], eb)
            frow = tl.sum(tl.where((bi[:, None] == c) & (bi[None, :] > c), fb, 0.0), axis=0)
            wb = wb - err[:, None] * frow[None, :]
        codes = tl.where(sel[None, :, None], cb[:, None, :], codes)
        if j + 1 < NB:  # the block's errors reach every later channel in one product
            later = d[None, :] >= (j + 1) * BS
            fblk = tl.load(fh + (j * BS + bi)[:, None] * D + d[None, :], mask=later, other=0.0)
            w = w - tl.dot(eb, fblk, input_precision="ieee")
    q = tl.reshape(codes, (ROWS, D)).to(tl.int32)
    if W1 == 0:
        _pack_store(C, q, rows, tmask, stride_c, D, W0, ROWS)
    else:  # bit planes, low bits first, each packed whole bytes after the previous plane's
        _pack_store(C, q & ((1 << W0) - 1), rows, tmask, stride_c, D, W0, ROWS)
        _pack_store(C + D * W0 // 8, q >> W0, rows, tmask, stride_c, D, W1, ROWS)


def fused_supported(x: torch.Tensor, bits: int, granularity: str, group_size: int | None) -> bool:
    """Shapes the kernel covers: 16 <= head_dim <= 256 and what the Triton quantize kernel takes."""
    return x.dim() == 4 and bits in PLANE_WIDTHS and 16 <= x.shape[-1] <= 256 and supported(x, granularity, group_size)


def quantize_keys(x: torch.Tensor, bits: int, granularity: str, group_size: int | None, factor: torch.Tensor,
                  meta: torch.dtype | None = None) -> quant.QuantizedTensor:
    """Triton :func:`kvtuner.rounding.quantize_keys` for ``[B, H, T, D]`` keys (``factor`` ``[H, D, D]``);
    shapes it does not cover go to the reference."""
    from .. import rounding

    if not fused_supported(x, bits, granularity, group_size):
        return rounding.quantize_keys(x, bits, granularity, group_size, factor)
    meta = quant.check_meta(meta, x.dtype)
    b, h, t, d = x.shape
    x = x.contiguous()
    eps, tiny = _LIMITS.get(meta, (0.0, 0.0))
    width = quant.packed_width(d, bits)
    codes = torch.empty(b, h, t, width, device=x.device, dtype=torch.uint8)
    planes = PLANE_WIDTHS[bits]
    if granularity == "per_channel":
        g = t if group_size is None else group_size
        scale = torch.empty(b, h, t // g, d, device=x.device, dtype=meta)
    else:
        g = d if group_size is None else group_size
        scale = torch.empty(b, h, t, d // g, device=x.device, dtype=meta)
    rows = 16  # small blocks of rows: many programs to hide the serial channel loop's latency
    zero = torch.empty_like(scale)
    _quant_round_kernel[(b * h, triton.cdiv(t, rows))](
        x, factor.to(device=x.device, dtype=torch.float32).contiguous(), codes, scale, zero, t, h, width, D=d, ROWS=rows,
        G=g, PER_CHANNEL=granularity == "per_channel", BS=16, BITS=bits, W0=planes[0],
        W1=planes[1] if len(planes) > 1 else 0, EPS=eps, TINY=tiny, OUT=_TL[meta])
    return quant.QuantizedTensor(codes, scale, zero, bits, granularity, g, d)
