"""Triton decode-step write: a step's key and value, each Hadamard-rotated if its store is, into their
static residual slot, in one launch.

The reference (:meth:`kvtuner.store.TensorStore.static_write`) costs up to four launches per tensor
(fp32 copy, product, cast, ``index_copy_``), about 15 µs per layer and step inside a CUDA graph, which
made rotated plans a few per cent slower per decode step than unrotated ones. Here one program takes
16 (sequence, head) rows of one tensor; the rotation is an fp32 product with the orthonormal matrix,
as :func:`kvtuner.quant.rotate` computes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quant

ROWS = 16


@triton.jit
def _write_rows(X, sxb, sxh, BUF, HAD, slot, slots, n_rows, H, pid, D: tl.constexpr, BN: tl.constexpr,
                ROT: tl.constexpr):
    r = pid * 16 + tl.arange(0, 16)
    rmask = r < n_rows
    xoff = (r // H).to(tl.int64) * sxb + (r % H).to(tl.int64) * sxh
    dst = (r.to(tl.int64) * slots + slot) * D
    if ROT:
        d = tl.arange(0, D)
        x = tl.load(X + xoff[:, None] + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        for n in tl.static_range(D // BN):
            cols = n * BN + tl.arange(0, BN)
            h = tl.load(HAD + d[:, None] * D + cols[None, :])
            y = tl.dot(x, h, input_precision="ieee")
            tl.store(BUF + dst[:, None] + cols[None, :], y.to(BUF.dtype.element_ty), mask=rmask[:, None])
    else:
        d = tl.arange(0, D)
        x = tl.load(X + xoff[:, None] + d[None, :], mask=rmask[:, None], other=0.0)
        tl.store(BUF + dst[:, None] + d[None, :], x.to(BUF.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _write_step_kernel(K, skb, skh, V, svb, svh, KBUF, VBUF, HAD, SLOT, slots_k, slots_v, n_rows, H,
                       D: tl.constexpr, BN: tl.constexpr, ROT_K: tl.constexpr, ROT_V: tl.constexpr):
    slot = tl.load(SLOT).to(tl.int64)
    if tl.program_id(1) == 0:
        _write_rows(K, skb, skh, KBUF, HAD, slot, slots_k, n_rows, H, tl.program_id(0), D, BN, ROT_K)
    else:
        _write_rows(V, svb, svh, VBUF, HAD, slot, slots_v, n_rows, H, tl.program_id(0), D, BN, ROT_V)


def supported(key: torch.Tensor, value: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor) -> bool:
    """One token per sequence, a power-of-two head_dim in [16, 256], unit channel stride, contiguous buffers."""
    d = key.shape[-1]
    return (key.shape[-2] == 1 and d & (d - 1) == 0 and 16 <= d <= 256 and key.stride(-1) == value.stride(-1) == 1
            and kbuf.is_contiguous() and vbuf.is_contiguous() and key.shape == value.shape
            and kbuf.shape[:2] == vbuf.shape[:2] == key.shape[:2] and kbuf.shape[-1] == vbuf.shape[-1] == d)


def write_step(key: torch.Tensor, value: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, slot: torch.Tensor,
               rotate_key: bool, rotate_value: bool) -> None:
    """``kbuf[:, :, slot] = key @ H if rotate_key else key`` (and the same for values) for one-token
    ``[B, H, 1, D]`` inputs and contiguous ``[B, H, slots, D]`` buffers (their slot counts may differ);
    ``slot`` a one-element device tensor (capturable in a CUDA graph)."""
    b, h, _, d = key.shape
    n = b * h
    had = quant.hadamard(d, key.device) if rotate_key or rotate_value else kbuf
    _write_step_kernel[(triton.cdiv(n, ROWS), 2)](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1), kbuf, vbuf, had, slot,
        kbuf.shape[2], vbuf.shape[2], n, h, D=d, BN=min(d, 64), ROT_K=bool(rotate_key), ROT_V=bool(rotate_value))
