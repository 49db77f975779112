"""Triton query-aware key rounding: :func:`kvtuner.rounding.round_codes` in one launch.

The reference loops over channels in PyTorch, a dozen small kernels per channel; here each program holds
a block of token rows in registers and walks the channels itself, so a flush of the cache's keys costs one
launch. Codes equal the reference's except where fused multiply-adds move a value across a rounding tie
(tests bound how often and by how much).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quantize import _rint


@triton.jit
def _round_codes_kernel(X, S, Z, F, C, n_rows, T, H, D: tl.constexpr, ROWS: tl.constexpr, TOP: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    head = ((rows // T) % H).to(tl.int64)
    d = tl.arange(0, D)
    off = rows.to(tl.int64)[:, None] * D + d[None, :]
    m2 = rmask[:, None]
    w = tl.load(X + off, mask=m2, other=0.0).to(tl.float32)
    s = tl.load(S + off, mask=m2, other=1.0)
    z = tl.load(Z + off, mask=m2, other=0.0)
    codes = tl.zeros((ROWS, D), tl.float32)
    for c in range(D):
        sel = d[None, :] == c
        wc = tl.sum(tl.where(sel, w, 0.0), axis=1)
        sc = tl.sum(tl.where(sel, s, 0.0), axis=1)
        zc = tl.sum(tl.where(sel, z, 0.0), axis=1)
        q = tl.where(sc > 0, _rint(tl.math.div_rn(wc - zc, tl.where(sc > 0, sc, 1.0))), 0.0)
        q = tl.minimum(tl.maximum(q, 0.0), TOP + 0.0)
        codes = tl.where(sel, q[:, None], codes)
        frow = tl.load(F + head[:, None] * (D * D) + c * D + d[None, :], mask=m2, other=0.0)
        fcc = tl.load(F + head * (D * D) + c * D + c, mask=rmask, other=1.0)
        err = tl.math.div_rn(wc - (q * sc + zc), fcc)
        w = w - tl.where(d[None, :] > c, err[:, None] * frow, 0.0)
    tl.store(C + off, codes.to(tl.uint8), mask=m2)


def round_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, factor: torch.Tensor
                ) -> torch.Tensor:
    """Triton :func:`kvtuner.rounding.round_codes` for ``[B, H, T, D]`` inputs with a power-of-two ``D``."""
    from .. import rounding

    b, h, t, d = x.shape
    if d & (d - 1) or d < 2 or x.numel() == 0:
        return rounding.round_codes(x, scale, zero, bits, factor)
    n = b * h * t
    xs = x.float().contiguous()
    codes = torch.empty(b, h, t, d, dtype=torch.uint8, device=x.device)
    rows = 16 if d <= 128 else 8
    _round_codes_kernel[(triton.cdiv(n, rows),)](xs, scale.float().contiguous(), zero.float().contiguous(),
                                                 factor.float().contiguous(), codes, n, t, h, D=d, ROWS=rows,
                                                 TOP=2 ** bits - 1)
    return codes
