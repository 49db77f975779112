"""Triton decode-step write: a step's key and value, each Hadamard-rotated if its store is, into their
static residual slot, in one launch.

The reference (:meth:`kvtuner.store.TensorStore.static_write`) costs up to four launches per tensor
(fp32 copy, product, cast, ``index_copy_``), launches that a rotated layer pays at every step. Here one program takes
16 (sequence, head) rows of one tensor and rotates them in registers with a fast Walsh-Hadamard
transform in fp32 (as :func:`kvtuner.quant.rotate`'s fp32 product, up to the order of the sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .unpack import hadamard_rows

ROWS = 16


@triton.jit
def _write_rows(X, sxb, sxh, BUF, slot, slots, n_rows, H, pid, D: tl.constexpr, LOG_D: tl.constexpr,
                ROT: tl.constexpr):
    r = pid * 16 + tl.arange(0, 16)
    rmask = r < n_rows
    xoff = (r // H).to(tl.int64) * sxb + (r % H).to(tl.int64) * sxh
    dst = (r.to(tl.int64) * slots + slot) * D
    d = tl.arange(0, D)
    x = tl.load(X + xoff[:, None] + d[None, :], mask=rmask[:, None], other=0.0)
    if ROT:  # x @ H = (x S) / sqrt(D): butterflies in registers, fp32 as quant.rotate
        x = hadamard_rows(x.to(tl.float32), LOG_D) * (1.0 / tl.sqrt(D + 0.0))
    tl.store(BUF + dst[:, None] + d[None, :], x.to(BUF.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _write_step_kernel(K, skb, skh, V, svb, svh, KBUF, VBUF, SLOT, slots_k, slots_v, n_rows, H,
                       D: tl.constexpr, LOG_D: tl.constexpr, ROT_K: tl.constexpr, ROT_V: tl.constexpr):
    slot = tl.load(SLOT).to(tl.int64)
    if tl.program_id(1) == 0:
        _write_rows(K, skb, skh, KBUF, slot, slots_k, n_rows, H, tl.program_id(0), D, LOG_D, ROT_K)
    else:
        _write_rows(V, svb, svh, VBUF, slot, slots_v, n_rows, H, tl.program_id(0), D, LOG_D, ROT_V)


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
    _write_step_kernel[(triton.cdiv(n, ROWS), 2)](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1), kbuf, vbuf, slot,
        kbuf.shape[2], vbuf.shape[2], n, h, D=d, LOG_D=d.bit_length() - 1, ROT_K=bool(rotate_key), ROT_V=bool(rotate_value))
