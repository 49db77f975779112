"""Triton query-aware key quantization: :func:`kvtuner.rounding.quantize_keys` in one launch.

One program takes one block of ``TB`` tokens (32 per warp) of one (sequence, KV head), so every row
shares one factor ``U``. It computes the min/max grid (scales and zeros exactly as
:func:`kvtuner.kernels.quantize.quantize`) on the whole tile, then rounds with **one row per thread**:
rounding walks the channels serially, and a step that is a cross-thread reduction (a tile layout) waits
on shuffles at every channel, while a step on a per-thread vector is a handful of register
instructions. The tile leaves its values in a per-program scratch, channel-major, so a thread's
channel loads coalesce across the warp and touch only its own row (no barrier inside the walk).
Channels go in blocks of ``BS``: inside a block the errors stay in registers (a tuple) and reach the
block's later channels at once; after the block they reach every later channel in the scratch, in the
same order as the reference (channel by channel), so only fused multiply-adds can move a value
across a rounding tie. The codes go back through the scratch to be packed as a tile, bit planes
included. A flush of the cache's keys is one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quant
from ..spec import PLANE_WIDTHS
from .quantize import _LIMITS, _TL, _pack_store, _qparams, _rint, supported

ROWS_PER_WARP = 32
BLOCK_CHANNELS = 16
UNROLL = 4  # later channels updated per loop step: independent chains the scheduler can interleave


@triton.jit
def _quant_round_kernel(X, F, C, S, Z, WS, CC, T, H, stride_c, D: tl.constexpr, TB: tl.constexpr,
                        G: tl.constexpr, PER_CHANNEL: tl.constexpr, BS: tl.constexpr, UNR: tl.constexpr,
                        BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, EPS: tl.constexpr,
                        TINY: tl.constexpr, OUT: tl.constexpr):
    NB: tl.constexpr = D // BS
    n = tl.program_id(0).to(tl.int64)  # sequence * H + head
    blk = tl.program_id(1)
    tile = tl.arange(0, TB)
    t = blk * TB + tile
    tmask = t < T
    d = tl.arange(0, D)
    rows = n * T + t
    x = tl.load(X + rows[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    if PER_CHANNEL:  # TB // G whole groups of G tokens per channel
        NGT: tl.constexpr = TB // G
        xg = tl.reshape(x, (NGT, G, D))
        scale, zero = _qparams(tl.min(xg, axis=1), tl.max(xg, axis=1), BITS, EPS, TINY, OUT)
        gi = blk * NGT + tl.arange(0, NGT)
        goff = (n * (T // G) + gi)[:, None] * D + d[None, :]
        tl.store(S + goff, scale, mask=(gi * G < T)[:, None])
        tl.store(Z + goff, zero, mask=(gi * G < T)[:, None])
    else:  # groups of G channels per token
        NG: tl.constexpr = D // G
        xg = tl.reshape(x, (TB, NG, G))
        scale, zero = _qparams(tl.min(xg, axis=2), tl.max(xg, axis=2), BITS, EPS, TINY, OUT)
        j = tl.arange(0, NG)
        tl.store(S + rows[:, None] * NG + j[None, :], scale, mask=tmask[:, None])
        tl.store(Z + rows[:, None] * NG + j[None, :], zero, mask=tmask[:, None])
    prog = n * tl.num_programs(1) + blk
    ws = WS + prog * (D * TB)  # working values, channel-major: [D, TB] fp32
    cc = CC + prog * (D * TB)  # codes, channel-major: [D, TB] uint8
    tl.store(ws + d[None, :] * TB + tile[:, None], x)
    tl.debug_barrier()  # the walk reads rows other threads stored, and the grid

    r = tl.arange(0, TB)  # one row per thread from here to the packing
    rt = blk * TB + r
    rmask = rt < T
    if PER_CHANNEL:
        sp = S + (n * (T // G) + rt // G) * D
        zp = Z + (n * (T // G) + rt // G) * D
    else:
        sp = S + (n * T + rt) * (D // G)
        zp = Z + (n * T + rt) * (D // G)
    fh = F + (n % H) * (D * D)
    for jb in range(NB):
        c0 = jb * BS
        errs = ()
        for c in tl.static_range(BS):
            ch = c0 + c
            w = tl.load(ws + ch * TB + r)
            for e in tl.static_range(c):  # the block's earlier channels, in order
                w = w - errs[e] * tl.load(fh + (c0 + e) * D + ch)
            if PER_CHANNEL:
                sc = tl.load(sp + ch, mask=rmask, other=0.0).to(tl.float32)
                zc = tl.load(zp + ch, mask=rmask, other=0.0).to(tl.float32)
            else:
                sc = tl.load(sp + ch // G, mask=rmask, other=0.0).to(tl.float32)
                zc = tl.load(zp + ch // G, mask=rmask, other=0.0).to(tl.float32)
            q = tl.where(sc > 0, _rint(tl.math.div_rn(w - zc, tl.where(sc > 0, sc, 1.0))), 0.0)
            q = tl.minimum(tl.maximum(q, 0.0), 2.0**BITS - 1.0)
            tl.store(cc + ch * TB + r, q.to(tl.uint8))
            errs = errs + (tl.math.div_rn(w - (q * sc + zc), tl.load(fh + ch * (D + 1))),)
        for cl in range(c0 + BS, D, UNR):  # the block's errors reach every later channel
            for u in tl.static_range(UNR):
                lw = ws + (cl + u) * TB + r
                w = tl.load(lw)
                for e in tl.static_range(BS):
                    w = w - errs[e] * tl.load(fh + (c0 + e) * D + cl + u)
                tl.store(lw, w)
    tl.debug_barrier()  # the packing reads codes other threads stored
    q = tl.load(cc + d[None, :] * TB + tile[:, None]).to(tl.int32)
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
        tb = max(g, ROWS_PER_WARP)  # whole groups, at least a warp of rows
    else:
        g = d if group_size is None else group_size
        scale = torch.empty(b, h, t, d // g, device=x.device, dtype=meta)
        tb = ROWS_PER_WARP
    zero = torch.empty_like(scale)
    grid = (b * h, triton.cdiv(t, tb))
    scratch = torch.empty(grid[0] * grid[1] * d * tb * 5, device=x.device, dtype=torch.uint8)
    ws = scratch[: grid[0] * grid[1] * d * tb * 4].view(torch.float32)
    cc = scratch[grid[0] * grid[1] * d * tb * 4:]
    _quant_round_kernel[grid](
        x, factor.to(device=x.device, dtype=torch.float32).contiguous(), codes, scale, zero, ws, cc, t, h, width, D=d,
        TB=tb, G=g, PER_CHANNEL=granularity == "per_channel", BS=min(BLOCK_CHANNELS, d), UNR=UNROLL, BITS=bits,
        W0=planes[0], W1=planes[1] if len(planes) > 1 else 0, EPS=eps, TINY=tiny, OUT=_TL[meta],
        num_warps=tb // ROWS_PER_WARP)
    return quant.QuantizedTensor(codes, scale, zero, bits, granularity, g, d)
