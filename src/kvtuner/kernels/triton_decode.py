"""Fused decode attention over the packed cache (Triton); same signature as
:func:`kvtuner.attention.decode_attention`, which is its specification.

Design (see ``shared/PERF.md``):

* grid ``(B * Hkv, splits)``: one program holds *all* query heads of one KV head as a
  ``[BLOCK_H >= 16, D]`` tile, so every packed byte is read once (GQA/MQA);
* split-K over the quantized tokens plus one extra split for the full-precision residual window,
  partial ``(acc, max, sum)`` in fp32, merged by a second kernel with a log-sum-exp merge that
  ignores empty splits;
* codes are unpacked in registers, never written back: bit widths are ``tl.constexpr``, so a mixed
  plan compiles one variant per (k_bits, v_bits) pair;
* scales never become per-element gathers. Per bit pair (``launch_defaults``) a key group's ``[D]``
  scale/zero row is folded into the query (``(q*s) . c + q . z``) or applied to the fp16 tile in
  registers; per-token value scales are applied in registers or folded into the probabilities.
  Folds that first divide by the tile's largest scale (kept as ``fold="norm"``) cost two cross-warp
  reductions per tile, 20-25 % of the time on an H100. Other group shapes broadcast a small
  ``[rows, groups]`` tile;
* dot products run in fp16 whatever the model dtype: codes (< 256) are exact in fp16, and fp16
  keeps 3 more mantissa bits than bf16 for the folded operands;
* values in token blocks (``quant.to_token_blocks``, ``VT``: one block per tile) are unpacked as a
  ``[D, N]`` tile straight into the registers of the ``acc^T = V^T P^T`` MMA; values packed along
  head_dim are unpacked, written to shared memory as fp16 and read back transposed;
* base-2 online softmax with ``scaling * log2(e)`` folded into q;
* offsets that scale with batch x heads x tokens are computed in int64.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from ..quant import PLANES, QuantizedTensor, length_unit
from .launch import CachedLauncher

LOG2E = 1.4426950408889634
last_compiled = None  # the split kernel's last launch (benchmarks read registers/spills from it)


@triton.jit
def _plane_bytes(base, t, tmask, stride_t, col0, D: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr):
    """The bytes of one bit plane of ``W`` bits (1, 2, 4 or 8), starting ``col0`` bytes into each
    token row: ``[len(t), BLOCK_D * W / 8]`` uint8, each byte loaded once (contiguous rows)."""
    PER: tl.constexpr = 8 // W
    w = tl.arange(0, BLOCK_D // PER)
    ptr = base + t.to(tl.int64)[:, None] * stride_t + col0 + w[None, :]
    return tl.load(ptr, mask=tmask[:, None] & (w < (D + PER - 1) // PER)[None, :], other=0)


@triton.jit
def _channels4(c0, c1, c2, c3):
    """Codes 0..3 of each byte (lowest bits first) back in channel order: code k -> channel 4j + k."""
    return tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))


@triton.jit
def _channels8(c0, c1, c2, c3, c4, c5, c6, c7):
    """Codes 0..7 of each byte (lowest bit first) back in channel order: code k -> channel 8j + k."""
    return tl.interleave(_channels4(c0, c2, c4, c6), _channels4(c1, c3, c5, c7))


@triton.jit
def _decode_plane(b, W: tl.constexpr):
    """The codes of bytes ``b`` ``[R, C]`` of one bit plane as uint16 ``[R, C * 8 / W]``, in order
    along the last dim: the codes of a byte are split with shifts in 16-bit lanes and put back in
    order with ``tl.interleave``."""
    b = b.to(tl.uint16)
    if W == 8:
        c = b
    elif W == 4:
        c = tl.interleave(b & 15, b >> 4)
    elif W == 2:
        c = _channels4(b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6)
    else:
        c = _channels8(b & 1, (b >> 1) & 1, (b >> 2) & 1, (b >> 3) & 1, (b >> 4) & 1, (b >> 5) & 1, (b >> 6) & 1,
                       b >> 7)
    return c


@triton.jit
def _unpack_plane(base, t, tmask, stride_t, col0, D: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr):
    """One bit plane as uint16 codes ``[len(t), BLOCK_D]`` in channel order."""
    return _decode_plane(_plane_bytes(base, t, tmask, stride_t, col0, D, BLOCK_D, W), W)


# Packed bit-trick unpacking (PTX, 4 bytes per call; PERF.md section 7 item 4): bytes are spread
# into the low halves of fp16x2 lanes with ``prmt``, masked and OR-ed with the exponent 0x6400 in
# one ``lop3`` (fp16 value 1024 + code << shift), then scaled back to the code with one packed
# ``sub``/``fma``. Outputs: one fp16 tensor per code position in the byte, lowest bits first.
_ASM8 = tl.constexpr("""{
.reg .b32 m;
mov.b32 m, 0x64006400;
prmt.b32 $0, $2, 0x64646464, 0x4140;
prmt.b32 $1, $2, 0x64646464, 0x4342;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
}""")
_ASM4 = tl.constexpr("""{
.reg .b32 t0, t1, m, s, o;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
mov.b32 m, 0x64006400;
mov.b32 s, 0x2c002c00;
mov.b32 o, 0xd400d400;
lop3.b32 $0, t0, 0x000f000f, m, 0xea;
lop3.b32 $1, t1, 0x000f000f, m, 0xea;
lop3.b32 $2, t0, 0x00f000f0, m, 0xea;
lop3.b32 $3, t1, 0x00f000f0, m, 0xea;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
fma.rn.f16x2 $2, $2, s, o;
fma.rn.f16x2 $3, $3, s, o;
}""")
_ASM2 = tl.constexpr("""{
.reg .b32 t0, t1, m, s4, o4, s16, o16, s64, o64;
prmt.b32 t0, $8, 0, 0x4140;
prmt.b32 t1, $8, 0, 0x4342;
mov.b32 m, 0x64006400;
mov.b32 s4, 0x34003400;
mov.b32 o4, 0xdc00dc00;
mov.b32 s16, 0x2c002c00;
mov.b32 o16, 0xd400d400;
mov.b32 s64, 0x24002400;
mov.b32 o64, 0xcc00cc00;
lop3.b32 $0, t0, 0x00030003, m, 0xea;
lop3.b32 $1, t1, 0x00030003, m, 0xea;
lop3.b32 $2, t0, 0x000c000c, m, 0xea;
lop3.b32 $3, t1, 0x000c000c, m, 0xea;
lop3.b32 $4, t0, 0x00300030, m, 0xea;
lop3.b32 $5, t1, 0x00300030, m, 0xea;
lop3.b32 $6, t0, 0x00c000c0, m, 0xea;
lop3.b32 $7, t1, 0x00c000c0, m, 0xea;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
fma.rn.f16x2 $2, $2, s4, o4;
fma.rn.f16x2 $3, $3, s4, o4;
fma.rn.f16x2 $4, $4, s16, o16;
fma.rn.f16x2 $5, $5, s16, o16;
fma.rn.f16x2 $6, $6, s64, o64;
fma.rn.f16x2 $7, $7, s64, o64;
}""")


def _asm1_times4() -> str:
    """PTX for a 1-bit plane, each bit already multiplied by 4 (the 1-bit plane of a 3-bit code sits
    above a 2-bit plane): bit k becomes fp16 1024 + 2^k, then ``* 2^(2-k) - 1024 * 2^(2-k)``."""
    lines = ["{", ".reg .b32 t0, t1, m, s, o;", "prmt.b32 t0, $16, 0, 0x4140;", "prmt.b32 t1, $16, 0, 0x4342;",
             "mov.b32 m, 0x64006400;"]
    for k in range(8):
        scale, off = 2.0 ** (2 - k), -1024 * 2.0 ** (2 - k)
        lines += [f"mov.b32 s, {_f16x2(scale)};", f"mov.b32 o, {_f16x2(off)};"]
        for j, t in enumerate(("t0", "t1")):
            r = f"${2 * k + j}"
            lines += [f"lop3.b32 {r}, {t}, 0x{1 << k:04x}{1 << k:04x}, m, 0xea;", f"fma.rn.f16x2 {r}, {r}, s, o;"]
    return "\n".join(lines + ["}"])


def _f16x2(x: float) -> str:
    """A PTX immediate holding ``x`` as fp16 in both halves of a 32-bit register."""
    h = int(torch.tensor(x, dtype=torch.float16).view(torch.int16).item()) & 0xFFFF
    return f"0x{h:04x}{h:04x}"


def _asm3() -> str:
    """PTX for 3-bit codes, both planes at once: input word ``w`` = 16 bits of the 2-bit plane (codes
    0..7, code k at bits 2k) | the 1-bit plane's byte << 16 (high bit of code k at bit 16 + k); two
    words per call (fp16x2 lanes: lane 0 from ``$8``, lane 1 from ``$9``); output k = code k.

    Per output: the high bit becomes fp16 ``1024 + h 2^k`` and the low bits ``1024 + l 4^j``
    (``j = k mod 4``, one ``lop3`` each), then ``t = (1024 + h 2^k) 2^(2-k) - 1024 (2^(2-k) + 4^-j)
    = 4h - 1024 4^-j`` and ``out = (1024 + l 4^j) 4^-j + t = l + 4h``: two packed FMAs, each result
    exact in fp16. Doing this in one call keeps both planes in one register layout; adding two
    separately unpacked planes made Triton convert layouts through shared memory (5x the shared
    stores of a 4-bit tile in an Nsight Compute profile).
    """
    lines = ["{", ".reg .b32 h, l0, l1, m, sh, sl, c, t;",
             "prmt.b32 h, $8, $9, 0x7632;",  # lane bytes: high-bit byte of w0 | of w1
             "prmt.b32 l0, $8, $9, 0x5410;",  # low 16 bits of each word: codes 0..3 in byte 0
             "prmt.b32 l1, $8, $9, 0x7531;",  # codes 4..7 moved to byte 0 of each lane
             "mov.b32 m, 0x64006400;"]
    for k in range(8):
        j = k % 4
        sh, sl = 2.0 ** (2 - k), 4.0 ** -j
        lines += [f"mov.b32 sh, {_f16x2(sh)};", f"mov.b32 sl, {_f16x2(sl)};", f"mov.b32 c, {_f16x2(-1024 * (sh + sl))};",
                  f"lop3.b32 t, h, 0x{1 << k:04x}{1 << k:04x}, m, 0xea;",
                  "fma.rn.f16x2 t, t, sh, c;",
                  f"lop3.b32 ${k}, {'l0' if k < 4 else 'l1'}, 0x{3 << 2 * j:04x}{3 << 2 * j:04x}, m, 0xea;",
                  f"fma.rn.f16x2 ${k}, ${k}, sl, t;"]
    return "\n".join(lines + ["}"])


def _asm3_nibble() -> str:
    """PTX for 3-bit codes from 16-bit elements ``e = low-plane byte | high-plane nibble << 8`` (4
    channels; code k's low bits at bit 2k, its high bit at 8 + k), two elements per call (fp16x2
    lanes); output k = code k of each element. After ``y = e >> 4`` the high bit sits at mantissa
    bit 4 + k: ``t = (1024 + h 2^(4+k)) 2^(-2-k) - 1024 (2^(-2-k) + 4^-k) = 4h - 1024 4^-k``, then
    ``out = (1024 + l 4^k) 4^-k + t = l + 4h`` (two lop3 and two packed FMAs, exact in fp16)."""
    lines = ["{", ".reg .b32 y, m, sh, sl, c, t;", "shr.b32 y, $4, 4;", "mov.b32 m, 0x64006400;"]
    for k in range(4):
        sh, sl = 2.0 ** (-2 - k), 4.0 ** -k
        lines += [f"mov.b32 sh, {_f16x2(sh)};", f"mov.b32 sl, {_f16x2(sl)};", f"mov.b32 c, {_f16x2(-1024 * (sh + sl))};",
                  f"lop3.b32 t, y, 0x{1 << 4 + k:04x}{1 << 4 + k:04x}, m, 0xea;", "fma.rn.f16x2 t, t, sh, c;",
                  f"lop3.b32 ${k}, $4, 0x{3 << 2 * k:04x}{3 << 2 * k:04x}, m, 0xea;", f"fma.rn.f16x2 ${k}, ${k}, sl, t;"]
    return "\n".join(lines + ["}"])


def _asm3_pairs() -> str:
    """PTX for 3-bit codes in pair order (``quant.to_token_blocks``, 3 bits): per call two 16-bit units
    of the 2-bit plane (``$8``: code ``f`` of byte ``k`` of unit ``u`` is element ``8 u + 2 f + k``)
    and their two bytes of the 1-bit plane (``$9``, 16 bits: byte ``k`` keeps element ``8 u + 2 f +
    k``'s high bit at bit ``2 f + 1 - u``). Output ``4 u + f`` holds elements ``8 u + 2 f + {0, 1}``.

    The high bits are moved next to the low ones once per call (one shift per unit puts every high
    bit of that unit at bit ``2 f + 2`` of both fp16 lanes), so that per output one ``lop3`` takes
    the low bits with the exponent ``0x6400``, one ``lop3`` adds the high bit, and one packed FMA
    scales ``1024 + (l + 4 h) 4^f`` back to the code: 3 instructions per 2 codes, against 5 for the
    two planes unpacked apart and added."""
    lines = ["{", ".reg .b32 m, l0, l1, x, h0, h1, t, s, o;", "mov.b32 m, 0x64006400;",
             "prmt.b32 l0, $8, 0, 0x4140;", "prmt.b32 l1, $8, 0, 0x4342;",
             "cvt.u32.u16 x, $9;", "prmt.b32 x, x, 0, 0x4140;", "shl.b32 h0, x, 1;", "shl.b32 h1, x, 2;"]
    for u in range(2):
        for f in range(4):
            r = f"${4 * u + f}"
            lines += [f"lop3.b32 t, l{u}, 0x{3 << 2 * f:04x}{3 << 2 * f:04x}, m, 0xea;",
                      f"lop3.b32 {r}, h{u}, 0x{4 << 2 * f:04x}{4 << 2 * f:04x}, t, 0xea;"]
            lines += _to_code(r, 4.0 ** -f)
    return "\n".join(lines + ["}"])


def _to_code(r: str, scale: float) -> list[str]:
    """PTX turning fp16 ``1024 + c / scale`` in both lanes of ``r`` into ``c``: one ``sub`` of ``m``
    (``0x64006400``) where ``scale == 1``, else one packed FMA by ``scale`` (registers ``s``, ``o``)."""
    if scale == 1:
        return [f"sub.f16x2 {r}, {r}, m;"]
    return [f"mov.b32 s, {_f16x2(scale)};", f"mov.b32 o, {_f16x2(-1024 * scale)};", f"fma.rn.f16x2 {r}, {r}, s, o;"]


def _asm3_contiguous() -> str:
    """PTX for 3-bit codes stored contiguously (``quant.to_channel_words``, 3 bits): input word ``w`` =
    the 24 bits of 8 channels, code ``k`` at bits ``3k .. 3k + 2``; two words per call (fp16x2 lanes:
    lane 0 from ``$8``, lane 1 from ``$9``); output ``k`` = code ``k``.

    Three byte moves put the 16 bits starting at bit 0, 8 and 16 of each word into its lane, so that
    every code lies whole inside the fp16 mantissa (codes 0-2 at bits 0, 3, 6; codes 3-5 at 1, 4, 7;
    codes 6-7 at 2, 5); then one ``lop3`` (mask and exponent ``0x6400``: fp16 ``1024 + c 2^s``) and one
    packed ``fma`` by ``2^-s`` (``sub`` for ``s = 0``) per output: 2 instructions per 2 codes, against
    4 for the two planes (:func:`_asm3`)."""
    lines = ["{", ".reg .b32 x0, x1, x2, m, s, o;", "mov.b32 m, 0x64006400;",
             "prmt.b32 x0, $8, $9, 0x5410;", "prmt.b32 x1, $8, $9, 0x6521;", "prmt.b32 x2, $8, $9, 0x7632;"]
    for k in range(8):
        src, shift = (("x0", 3 * k) if k < 3 else ("x1", 3 * k - 8) if k < 6 else ("x2", 3 * k - 16))
        mask = 7 << shift
        lines += [f"lop3.b32 ${k}, {src}, 0x{mask:04x}{mask:04x}, m, 0xea;", *_to_code(f"${k}", 2.0 ** -shift)]
    return "\n".join(lines + ["}"])


_ASM3C = tl.constexpr(_asm3_contiguous())
_ASM3P = tl.constexpr(_asm3_pairs())
# 8-channel words of a 3-bit row per thread (:func:`_unpack3_asm`): values packed along head_dim are
# transposed through shared memory, and with a whole row per thread each fp16 went there alone (STS.U16)
_ROW_UNITS3 = tl.constexpr(4)
_ASM1X4 = tl.constexpr(_asm1_times4())
_ASM3N = tl.constexpr(_asm3_nibble())
_ASM3 = tl.constexpr(_asm3())
_ASM3_CONSTRAINTS = tl.constexpr("=r," * 8 + "r,r")
_ASM1_CONSTRAINTS = tl.constexpr("=r," * 16 + "r")


@triton.jit
def _decode_plane_asm(b, W: tl.constexpr):
    """:func:`_decode_plane` straight to fp16 with packed PTX (CUDA only); ``W = 1`` returns bit * 4."""
    if W == 1:  # only as the upper plane of a 3-bit code (2-bit plane below): values are bit * 4
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            _ASM1X4, _ASM1_CONSTRAINTS, [b], dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                                                    tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
        c = _channels8(c0, c1, c2, c3, c4, c5, c6, c7)
    elif W == 8:
        c = tl.inline_asm_elementwise(_ASM8, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)
    elif W == 4:
        lo, hi = tl.inline_asm_elementwise(_ASM4, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)
        c = tl.interleave(lo, hi)
    else:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(_ASM2, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                                   dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                   is_pure=True, pack=4)
        c = _channels4(c0, c1, c2, c3)
    return c


@triton.jit
def _unpack_plane_asm(base, t, tmask, stride_t, col0, D: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr):
    """:func:`_unpack_plane` straight to fp16 with packed PTX (CUDA only); ``W = 1`` returns bit * 4."""
    return _decode_plane_asm(_plane_bytes(base, t, tmask, stride_t, col0, D, BLOCK_D, W), W)


@triton.jit
def _token_plane_bytes(base, d, dmask, t0, end, stride_t, col0, BLOCK_N: tl.constexpr, W: tl.constexpr):
    """The bytes of one bit plane of the token block that starts at token ``t0`` (``quant.to_token_blocks``,
    blocks of ``BLOCK_N`` tokens) for channels ``d``: ``[len(d), BLOCK_N * W / 8]`` uint8, channel
    rows of codes packed along tokens. ``col0`` is the plane's first byte in a token row; a block
    keeps each plane's ``[D, BLOCK_N * W / 8]`` bytes at ``BLOCK_N * col0``."""
    j = tl.arange(0, BLOCK_N * W // 8)
    ptr = base + t0.to(tl.int64) * stride_t + BLOCK_N * col0 + d.to(tl.int64)[:, None] * (BLOCK_N * W // 8) + j[None, :]
    # one mask per block: the stored length is whole blocks, so a per-token mask (which made the
    # loads byte-wise) is not needed; tokens past ``end`` inside a block get zero probability
    live = (t0 + j * 0) < end
    return tl.load(ptr, mask=dmask[:, None] & live[None, :], other=0)


@triton.jit
def _word_order(c, W: tl.constexpr):
    """Codes decoded in byte order (code ``f`` of byte ``j`` at ``j * 8 / W + f``) put in a token
    block's word order (``quant.to_token_blocks``): code ``f`` of byte ``k`` of a 32-bit word is
    element ``4 f + k`` of that word. The PTX unpackers return code ``f`` of 2 adjacent bytes in one
    fp16x2 register, so with this order a register holds 2 adjacent elements, as the MMA operand
    wants them (no repacking ``PRMT``s)."""
    P: tl.constexpr = 8 // W
    if P == 1:
        return c
    else:
        R: tl.constexpr = c.shape[0]
        N: tl.constexpr = c.shape[1]
        return tl.reshape(tl.permute(tl.reshape(c, (R, N // (4 * P), 4, P)), (0, 1, 3, 2)), (R, N))


@triton.jit
def _block_tokens(c):
    """A token block's elements (``quant.to_token_blocks``: ``s = 4 S c + 4 s + 2 h + i`` for
    ``S = N / 16`` slabs) in token order ``16 s + 8 h + 2 c + i``: each group of 4 MMA lanes reads
    its tokens of every 16-token slab as one contiguous run of bytes."""
    R: tl.constexpr = c.shape[0]
    N: tl.constexpr = c.shape[1]
    return tl.reshape(tl.permute(tl.reshape(c, (R, 4, N // 16, 2, 2)), (0, 2, 3, 1, 4)), (R, N))


@triton.jit
def _pairs3(lo, hi):
    """3-bit codes in pair order (:data:`_ASM3P`) from the 2-bit plane's 16-bit units ``lo`` ``[R, C]``
    and the 1-bit plane's bytes ``hi`` ``[R, C]`` as fp16 ``[R, 8 C]`` in element order."""
    o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
        _ASM3P, "=r,=r,=r,=r,=r,=r,=r,=r,r,h", [lo, hi], dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    s = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
    R: tl.constexpr = s.shape[0]
    C: tl.constexpr = s.shape[1]
    # each join appends a dim: s[r, 2 m + k, u, f1, f0] is element 16 m + 8 u + 2 f + k (f = 2 f1 + f0)
    s = tl.reshape(s, (R, C // 2, 2, 2, 2, 2))  # m, k, u, f1, f0
    return tl.reshape(tl.permute(s, (0, 1, 3, 4, 5, 2)), (R, C * 8))


@triton.jit
def _pairs3_ref(b0, b1):
    """:func:`_pairs3` without PTX, from the 2-bit plane's bytes ``b0`` ``[R, 2 C]`` and the 1-bit
    plane's bytes ``b1`` ``[R, C]``: both planes decoded in byte order, then put in element order."""
    R: tl.constexpr = b0.shape[0]
    N: tl.constexpr = b0.shape[1] * 4
    lo = tl.reshape(tl.permute(tl.reshape(_decode_plane(b0, 2), (R, N // 8, 2, 4)), (0, 1, 3, 2)), (R, N))
    h = tl.reshape(_decode_plane(b1, 1), (R, N // 16, 2, 4, 2))  # group, k, f, 1 - u
    u1, u0 = tl.split(h)  # bit 2 f of byte k belongs to unit 1, bit 2 f + 1 to unit 0
    hi = tl.reshape(tl.permute(tl.join(u0, u1), (0, 1, 4, 3, 2)), (R, N))  # group, u, f, k
    magic = tl.full([1, 1], 0x6400, tl.uint16)
    return ((lo | (hi << 2)) | magic).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _unpack_tokens(base, d, dmask, t0, end, stride_t, D: tl.constexpr, BLOCK_N: tl.constexpr, W0: tl.constexpr,
                   W1: tl.constexpr, VT: tl.constexpr, ASM: tl.constexpr):
    """Codes of a token-blocked tile as fp16 ``[len(d), BLOCK_N]`` (channels x tokens, token
    order; ``BLOCK_N == VT``): the transpose of :func:`_unpack`'s tile, unpacked along tokens."""
    col1: tl.constexpr = D * W0 // 8
    if W0 == 2 and W1 == 1:  # 3-bit codes in pair order: both planes joined per 16 elements
        if ASM:
            j = tl.arange(0, BLOCK_N // 8)
            blk = base + t0.to(tl.int64) * stride_t
            live = (t0 + j * 0) < end
            lo = tl.load(blk.to(tl.pointer_type(tl.uint16)) + d.to(tl.int64)[:, None] * (BLOCK_N // 8) + j[None, :],
                         mask=dmask[:, None] & live[None, :], other=0)
            hi = _token_plane_bytes(base, d, dmask, t0, end, stride_t, col1, BLOCK_N, 1)
            return _block_tokens(_pairs3(lo, hi))
        return _block_tokens(_pairs3_ref(_token_plane_bytes(base, d, dmask, t0, end, stride_t, 0, BLOCK_N, 2),
                                         _token_plane_bytes(base, d, dmask, t0, end, stride_t, col1, BLOCK_N, 1)))
    b0 = _token_plane_bytes(base, d, dmask, t0, end, stride_t, 0, BLOCK_N, W0)
    if ASM:
        c = _word_order(_decode_plane_asm(b0, W0), W0)
        if W1 > 0:
            b1 = _token_plane_bytes(base, d, dmask, t0, end, stride_t, col1, BLOCK_N, W1)
            c1 = _word_order(_decode_plane_asm(b1, W1), W1)
            c = c + (c1 if W1 == 1 else c1 * (1 << W0))  # a 1-bit plane comes back as bit * 4
        return _block_tokens(c)
    c = _word_order(_decode_plane(b0, W0), W0)
    if W1 > 0:
        b1 = _token_plane_bytes(base, d, dmask, t0, end, stride_t, col1, BLOCK_N, W1)
        c = c | (_word_order(_decode_plane(b1, W1), W1) << W0)
    magic = tl.full([1, 1], 0x6400, tl.uint16)
    return _block_tokens((c | magic).to(tl.float16, bitcast=True) - 1024.0)


@triton.jit
def _words3(base, t, tmask, stride_t, D: tl.constexpr, BLOCK_D: tl.constexpr, UNITS: tl.constexpr,
            WIDE: tl.constexpr):
    """The 3 bytes of each 8-channel unit of a 3-bit row as uint32 ``[len(t), BLOCK_D // 8]``: the 2 bytes
    at the start of the row (unit ``j``: bytes ``2j, 2j + 1``) | the byte at ``D / 4 + j`` << 16. ``WIDE``:
    the 2 bytes as one uint16 (needs ``D % 16 == 0``: every offset even). ``UNITS``: units per thread along
    the row (:data:`_ROW_UNITS3`; 0: Triton's choice, a whole row per thread)."""
    NW: tl.constexpr = BLOCK_D // 8
    j = tl.arange(0, NW)
    if UNITS > 0:
        j = tl.max_contiguous(j, UNITS)
    m = tmask[:, None] & (j < D // 8)[None, :]
    row = base + t.to(tl.int64)[:, None] * stride_t
    if WIDE:
        lo = tl.load(row.to(tl.pointer_type(tl.uint16)) + j[None, :], mask=m, other=0)
    else:
        lo = (tl.load(row + 2 * j[None, :], mask=m, other=0).to(tl.uint16)
              | (tl.load(row + 2 * j[None, :] + 1, mask=m, other=0).to(tl.uint16) << 8))
    hi = tl.load(row + D // 4 + j[None, :], mask=m, other=0)
    return lo.to(tl.uint32) | (hi.to(tl.uint32) << 16)


@triton.jit
def _unpack3_asm(base, t, tmask, stride_t, D: tl.constexpr, BLOCK_D: tl.constexpr, UNITS: tl.constexpr = 0):
    """3-bit codes ``[len(t), BLOCK_D]`` as fp16 from both planes in one PTX call per two words
    (:data:`_ASM3`): each word is 8 channels' 16 low-plane bits and their 8 high bits (:func:`_words3`).
    Needs ``D % 16 == 0``, so that every row and plane offset is even."""
    w = _words3(base, t, tmask, stride_t, D, BLOCK_D, UNITS, True)
    c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
        _ASM3, _ASM3_CONSTRAINTS, [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                                              tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
    return _channels8(c0, c1, c2, c3, c4, c5, c6, c7)


@triton.jit
def _unpack3c(base, t, tmask, stride_t, D: tl.constexpr, BLOCK_D: tl.constexpr, ASM: tl.constexpr,
              UNITS: tl.constexpr = 0):
    """Contiguous 3-bit codes (``quant.to_channel_words``, 3 bits) ``[len(t), BLOCK_D]`` as fp16: per 8
    channels a 24-bit word (:func:`_words3`: its low 16 bits where the 2-bit plane's 2 bytes are, its high
    8 where the 1-bit plane's byte is; ``D % 8 == 0``), code ``k`` at bits ``3k``."""
    w = _words3(base, t, tmask, stride_t, D, BLOCK_D, UNITS, ASM and D % 16 == 0)
    if ASM:
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            _ASM3C, _ASM3_CONSTRAINTS, [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                                                   tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
        return _channels8(c0, c1, c2, c3, c4, c5, c6, c7)
    c = _channels8(w & 7, (w >> 3) & 7, (w >> 6) & 7, (w >> 9) & 7, (w >> 12) & 7, (w >> 15) & 7, (w >> 18) & 7,
                   (w >> 21) & 7).to(tl.uint16)
    return (c | tl.full([1, 1], 0x6400, tl.uint16)).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _unpack3n_asm(base, t, tmask, stride_t, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """3-bit codes ``[len(t), BLOCK_D]`` as fp16, both planes per PTX call (:data:`_ASM3N`): each
    low-plane byte (4 channels) is paired with the matching nibble of the high plane, so the codes
    come out in the 2-bit plane's shape and register layout (one plane's 4 channels per element)."""
    lo = _plane_bytes(base, t, tmask, stride_t, 0, D, BLOCK_D, 2)
    # high-plane bytes in 8-byte vectors, so two threads share a row as for the low plane (a
    # 16-byte vector put a whole row in one thread, and the fp16 tile went to shared memory
    # one element at a time)
    w = tl.max_contiguous(tl.arange(0, BLOCK_D // 8), 8)
    hi = tl.load(base + t.to(tl.int64)[:, None] * stride_t + D // 4 + w[None, :],
                 mask=tmask[:, None] & (w < D // 8)[None, :], other=0)
    e = lo.to(tl.uint16) | ((tl.interleave(hi, hi >> 4) & 15).to(tl.uint16) << 8)
    c0, c1, c2, c3 = tl.inline_asm_elementwise(_ASM3N, "=r,=r,=r,=r,r", [e],
                                               dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                               is_pure=True, pack=2)
    return _channels4(c0, c1, c2, c3)


@triton.jit
def _unpack(base, t, tmask, stride_t, D: tl.constexpr, BLOCK_D: tl.constexpr, W0: tl.constexpr,
            W1: tl.constexpr, ASM: tl.constexpr, UNPACK3: tl.constexpr = 0, WORDS: tl.constexpr = False,
            UNITS3: tl.constexpr = 0):
    """Codes ``[len(t), BLOCK_D]`` as fp16 from one token row per ``t`` (layout: ``quant.py``).

    ``W0``/``W1`` are the bit planes of the code width (``quant.PLANES``; ``W1 = 0``: one plane):
    3 bits are 2 + 1, 6 bits 4 + 2, low bits first. The fp16 value comes from the exponent trick:
    ``0x6400 | c`` read as fp16 is ``1024 + c``. ``WORDS``: codes in word order
    (``quant.to_channel_words``), put back in channel order by relabelling registers.
    """
    col1: tl.constexpr = (D + 8 // W0 - 1) // (8 // W0)  # bytes of the first plane per token
    if W0 == 2 and W1 == 1 and WORDS:  # 3-bit codes in word order are contiguous 24-bit words
        return _unpack3c(base, t, tmask, stride_t, D, BLOCK_D, ASM, UNITS3)
    if ASM and UNPACK3 == 1 and W0 == 2 and W1 == 1 and D % 16 == 0:
        return _unpack3_asm(base, t, tmask, stride_t, D, BLOCK_D, UNITS3)
    if ASM and UNPACK3 == 2 and W0 == 2 and W1 == 1 and D % 8 == 0:
        return _unpack3n_asm(base, t, tmask, stride_t, D, BLOCK_D)
    if ASM:
        c = _unpack_plane_asm(base, t, tmask, stride_t, 0, D, BLOCK_D, W0)
        if WORDS:
            c = _word_order(c, W0)
        if W1 > 0:
            tl.static_assert(W1 > 1 or W0 == 2, "a 1-bit plane only sits above a 2-bit plane (3-bit codes)")
            c1 = _unpack_plane_asm(base, t, tmask, stride_t, col1, D, BLOCK_D, W1)
            if WORDS:
                c1 = _word_order(c1, W1)
            c = c + (c1 if W1 == 1 else c1 * (1 << W0))  # exact in fp16 (codes < 256); 1 bit comes as bit * 4
        return c
    c = _unpack_plane(base, t, tmask, stride_t, 0, D, BLOCK_D, W0)
    if WORDS:
        c = _word_order(c, W0)
    if W1 > 0:
        c1 = _unpack_plane(base, t, tmask, stride_t, col1, D, BLOCK_D, W1)
        if WORDS:
            c1 = _word_order(c1, W1)
        c = c | (c1 << W0)
    magic = tl.full([1, 1], 0x6400, tl.uint16)
    return (c | magic).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _dequant_groups(code, s_base, z_base, t, tmask, stride_t, D: tl.constexpr, G: tl.constexpr,
                    NG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F16: tl.constexpr = False):
    """``code * scale + zero`` as fp16 for per-token groups of ``G`` channels (``NG`` per row): the
    ``[BLOCK_N, NG]`` scale/zero tile is loaded once and broadcast, never gathered per element."""
    j = tl.arange(0, NG)
    smask = tmask[:, None] & (j * G < D)[None, :]
    off = t.to(tl.int64)[:, None] * stride_t + j[None, :]
    s_t = tl.load(s_base + off, mask=smask, other=0.0)
    z_t = tl.load(z_base + off, mask=smask, other=0.0)
    s_full = tl.reshape(tl.broadcast_to(s_t[:, :, None], (BLOCK_N, NG, G)), (BLOCK_N, BLOCK_D))
    z_full = tl.reshape(tl.broadcast_to(z_t[:, :, None], (BLOCK_N, NG, G)), (BLOCK_N, BLOCK_D))
    return _fma16(code, s_full, z_full, F16)


@triton.jit
def _fma16(code, s, z, F16: tl.constexpr):
    """``code * s + z`` as fp16: in fp16 registers (``F16``: one packed FMA per 2 elements, as the
    one-group tiles) or in fp32 (a convert per operand and element)."""
    if F16:
        return code.to(tl.float16) * s.to(tl.float16) + z.to(tl.float16)
    return (code.to(tl.float32) * s.to(tl.float32) + z.to(tl.float32)).to(tl.float16)


@triton.jit
def _hadamard_rows(x, LOG_D: tl.constexpr):
    """``x @ S`` for each row of ``x`` ``[R, 2**LOG_D]``, ``S`` the ``±1`` Sylvester Hadamard matrix
    (``quant.hadamard(..., normalized=False)``): a fast Walsh-Hadamard transform, ``LOG_D`` butterfly
    stages in registers (instead of a separate matmul launch on each side of a rotated layer)."""
    R: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    for s in tl.static_range(LOG_D):  # stage s pairs elements 2**s apart
        y = tl.permute(tl.reshape(x, (R, N >> (s + 1), 2, 1 << s)), (0, 1, 3, 2))
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, N))
    return x


@triton.jit
def _dequant_groups_t(code_t, s_base, z_base, t, tmask, stride_t, D: tl.constexpr, G: tl.constexpr,
                      NG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F16: tl.constexpr = False):
    """:func:`_dequant_groups` for a ``[BLOCK_D, BLOCK_N]`` (channels x tokens) tile."""
    j = tl.arange(0, NG)
    smask = (j * G < D)[:, None] & tmask[None, :]
    off = t.to(tl.int64)[None, :] * stride_t + j[:, None]
    s_t = tl.load(s_base + off, mask=smask, other=0.0)
    z_t = tl.load(z_base + off, mask=smask, other=0.0)
    s_full = tl.reshape(tl.broadcast_to(s_t[:, None, :], (NG, G, BLOCK_N)), (BLOCK_D, BLOCK_N))
    z_full = tl.reshape(tl.broadcast_to(z_t[:, None, :], (NG, G, BLOCK_N)), (BLOCK_D, BLOCK_N))
    return _fma16(code_t, s_full, z_full, F16)


@triton.jit
def _tok(v, SWAP: tl.constexpr):
    """A per-token vector broadcast against a scores tile (``[H, N]``, or ``[N, H]`` when ``SWAP``)."""
    if SWAP:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _head(v, SWAP: tl.constexpr):
    """A per-query-head vector broadcast against a scores tile."""
    if SWAP:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _qk(q16, k16, SWAP: tl.constexpr):
    """Scores of the ``[H, D]`` queries against a ``[N, D]`` key tile. ``SWAP`` computes
    ``S^T = K q^T``: the 128-token tile is then the wide MMA operand and the (padded) query heads
    the narrow one, as TurboMind's decode kernels do (PERF.md section 4.1)."""
    if SWAP:
        return tl.dot(k16, tl.trans(q16))
    else:
        return tl.dot(q16, tl.trans(k16))


@triton.jit
def _pv(p, v16, SWAP_QK: tl.constexpr, SWAP_PV: tl.constexpr):
    """``p . v`` in the accumulator's orientation (``[D, H]`` when ``SWAP_PV``, else ``[H, D]``) from
    probabilities in the scores' orientation."""
    if SWAP_PV:
        if SWAP_QK:
            return tl.dot(tl.trans(v16), p.to(tl.float16))
        else:
            return tl.dot(tl.trans(v16), tl.trans(p.to(tl.float16)))
    else:
        if SWAP_QK:
            return tl.dot(tl.trans(p.to(tl.float16)), v16)
        else:
            return tl.dot(p.to(tl.float16), v16)


@triton.jit
def _vtok(v, TOKENS_LAST: tl.constexpr):
    """A per-token vector broadcast against a value tile (``[N, D]``, or ``[D, N]`` for token blocks)."""
    if TOKENS_LAST:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _pv_tile(p, v, SWAP_QK: tl.constexpr, SWAP_PV: tl.constexpr, TOKENS_LAST: tl.constexpr):
    """:func:`_pv` for a value tile in either orientation (``[D, N]`` for token blocks)."""
    if TOKENS_LAST:  # the double transpose inside _pv folds away (sm_90 SASS byte-identical)
        return _pv(p, tl.trans(v), SWAP_QK, SWAP_PV)
    else:
        return _pv(p, v, SWAP_QK, SWAP_PV)


@triton.jit
def _softmax_step(scores, valid, m_i, l_i, acc, SWAP_QK: tl.constexpr, SWAP_PV: tl.constexpr):
    """One base-2 online-softmax step over a tile of masked scores: new running max and sum, the
    rescaled accumulator, and the tile's probabilities (a row that is all -inf so far stays at zero
    instead of NaN)."""
    TOK: tl.constexpr = 0 if SWAP_QK else 1
    scores = tl.where(_tok(valid, SWAP_QK), scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=TOK))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - _head(m_safe, SWAP_QK))
    return m_new, l_i * alpha + tl.sum(p, axis=TOK), acc * _head(alpha, SWAP_PV), p


# Integers that change at every decode step (the residual length, split counts, the mask's row
# stride) are not specialised: Triton would otherwise compile a new variant (~1 s, mid-generation)
# when one of them turns divisible by 16, e.g. when the residual window reaches 144 tokens. The
# quantized length stays specialised: in KIVI mode it is a multiple of the key group, and knowing
# that ``t < end`` is constant over 16 tokens lets the compiler merge the loads of adjacent 32-byte
# code rows (unspecialised, 2- and 3-bit layers ran 20 % slower). Strides stay specialised too:
# their divisibility is what vectorises the packed loads (unspecialised: a 2x slower step).
_VARYING = ["smask_b", "n_r", "num_q_splits", "NUM_SPLITS"]


@triton.jit(do_not_specialize=_VARYING)
def _decode_split_kernel(
        Q, KC, KS, KZ, VC, VS, VZ, KR, VR, MASK, LENS, PO, PM, PL,
        sq_b, sq_h,
        skc_b, skc_h, skc_t, sks_b, sks_h, sks_t,
        svc_b, svc_h, svc_t, svs_b, svs_h, svs_t,
        skr_b, skr_h, skr_t, svr_b, svr_h, svr_t,
        smask_b,
        n_q, n_r, tokens_per_split, num_q_splits, qk_scale, HKV, GROUP, NUM_SPLITS,
        BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        KW0: tl.constexpr, KW1: tl.constexpr, VW0: tl.constexpr, VW1: tl.constexpr, K_PER_CHANNEL: tl.constexpr,
        GK: tl.constexpr,
        GV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_MASK: tl.constexpr,
        SWAP_QK: tl.constexpr, SWAP_PV: tl.constexpr, ASM: tl.constexpr, FOLD_K: tl.constexpr,
        FOLD_V: tl.constexpr, DEV_LEN: tl.constexpr, QUNIT: tl.constexpr, UNPACK3_K: tl.constexpr,
        UNPACK3_V: tl.constexpr, VT: tl.constexpr, KWORDS: tl.constexpr, VWORDS: tl.constexpr,
        ROT_Q: tl.constexpr = False,
        LOG_D: tl.constexpr = 0, DQ16: tl.constexpr = False):
    if DEV_LEN:  # lengths live on the device (CUDA-graph replay): n_q/n_r passed in are capacities
        # the quantized length is stored in units of QUNIT (the key group in KIVI mode), so the
        # compiler still knows its divisibility, as it does for a specialised n_q
        n_q = tl.load(LENS).to(tl.int32) * QUNIT
        n_r = tl.load(LENS + 1).to(tl.int32)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)
    hrow = tl.arange(0, BLOCK_H)
    hmask = hrow < GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    TOK: tl.constexpr = 0 if SWAP_QK else 1
    q_ptr = Q + b * sq_b + (h * GROUP + hrow).to(tl.int64)[:, None] * sq_h + d[None, :]
    q = tl.load(q_ptr, mask=hmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if ROT_Q:  # keys stored as k H: scores need q H = q S / sqrt(D) (the 1/sqrt(D) is in qk_scale)
        q = _hadamard_rows(q, LOG_D)
    q = q * qk_scale

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    if SWAP_PV:
        acc = tl.zeros([BLOCK_D, BLOCK_H], tl.float32)
    else:
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)

    if split < num_q_splits:
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, n_q)
        kc = KC + b * skc_b + h * skc_h
        ks = KS + b * sks_b + h * sks_h
        kz = KZ + b * sks_b + h * sks_h
        vc = VC + b * svc_b + h * svc_h
        vs = VS + b * svs_b + h * svs_h
        vz = VZ + b * svs_b + h * svs_h
        # 3-bit keys load like 3-bit values packed along head_dim beside them (:data:`_ROW_UNITS3`; their
        # tiles share the layout); otherwise whole rows, which measured no worse
        KEY_UNITS3: tl.constexpr = _ROW_UNITS3 if (VT == 0 and VW0 == 2 and VW1 == 1) else 0
        span = tokens_per_split
        if DEV_LEN:  # splits sized for the capacity: stop at the filled length
            span = tl.maximum(tl.minimum(end - start, tokens_per_split), 0)
        for i in range(0, span, BLOCK_N):  # whole-split bound: tiles past ``end`` are masked
            t0 = start + i
            t = t0 + tl.arange(0, BLOCK_N)
            tmask = t < end
            # ---- scores = q . k^T, k = codes * scale + zero
            # [BLOCK_N, BLOCK_D] fp16
            kcode = _unpack(kc, t, tmask, skc_t, D, BLOCK_D, KW0, KW1, ASM, UNPACK3_K, KWORDS, KEY_UNITS3)
            if K_PER_CHANNEL:
                if GK % BLOCK_N == 0:  # the tile lies in one key group: fold its [D] scale/zero into q
                    g = (t0 // GK).to(tl.int64)
                    # a split's last tiles can lie past ``end``: their group row may not exist
                    rmask = dmask & (t0 < end)
                    s_row = tl.load(ks + g * sks_t + d, mask=rmask, other=0.0).to(tl.float32)
                    z_row = tl.load(kz + g * sks_t + d, mask=rmask, other=0.0).to(tl.float32)
                    if FOLD_K == 0:  # dequantize the tile in fp16 registers (one packed FMA per 2 elements)
                        k = kcode * s_row.to(tl.float16)[None, :] + z_row.to(tl.float16)[None, :]
                        scores = _qk(q.to(tl.float16), k, SWAP_QK)
                    elif FOLD_K == 1:
                        # dividing by the largest scale keeps the fp16 operand away from subnormals
                        s_max = tl.maximum(tl.max(s_row, axis=0), 1e-30)
                        qs = (q * (s_row / s_max)[None, :]).to(tl.float16)
                        qz = tl.sum(q * z_row[None, :], axis=1)
                        scores = _qk(qs, kcode, SWAP_QK) * s_max + _head(qz, SWAP_QK)
                    else:  # folded without the cross-warp max (tiny scales lose fp16 precision)
                        qs = (q * s_row[None, :]).to(tl.float16)
                        qz = tl.sum(q * z_row[None, :], axis=1)
                        scores = _qk(qs, kcode, SWAP_QK) + _head(qz, SWAP_QK)
                else:
                    NG: tl.constexpr = BLOCK_N // GK
                    g = (t0 // GK + tl.arange(0, NG)).to(tl.int64)
                    gmask = (g * GK < end)[:, None] & dmask[None, :]
                    s_t = tl.load(ks + g[:, None] * sks_t + d[None, :], mask=gmask, other=0.0)
                    z_t = tl.load(kz + g[:, None] * sks_t + d[None, :], mask=gmask, other=0.0)
                    s_full = tl.reshape(tl.broadcast_to(s_t[:, None, :], (NG, GK, BLOCK_D)), (BLOCK_N, BLOCK_D))
                    z_full = tl.reshape(tl.broadcast_to(z_t[:, None, :], (NG, GK, BLOCK_D)), (BLOCK_N, BLOCK_D))
                    scores = _qk(q.to(tl.float16), _fma16(kcode, s_full, z_full, DQ16), SWAP_QK)
            else:
                NGK: tl.constexpr = BLOCK_D // GK
                if NGK == 1:  # one scale per token and head: apply after the dot
                    s_col = tl.load(ks + t.to(tl.int64) * sks_t, mask=tmask, other=0.0).to(tl.float32)
                    z_col = tl.load(kz + t.to(tl.int64) * sks_t, mask=tmask, other=0.0).to(tl.float32)
                    qsum = tl.sum(q, axis=1)
                    scores = _qk(q.to(tl.float16), kcode, SWAP_QK) * _tok(s_col, SWAP_QK) \
                        + _head(qsum, SWAP_QK) * _tok(z_col, SWAP_QK)
                else:
                    k = _dequant_groups(kcode, ks, kz, t, tmask, sks_t, D, GK, NGK, BLOCK_N, BLOCK_D, DQ16)
                    scores = _qk(q.to(tl.float16), k, SWAP_QK)
            valid = tmask
            if HAS_MASK:
                mk = tl.load(MASK + b * smask_b + t, mask=tmask, other=0)
                valid = valid & (mk != 0)
            m_i, l_i, acc, p = _softmax_step(scores, valid, m_i, l_i, acc, SWAP_QK, SWAP_PV)
            # ---- acc += p . v, v = codes * scale + zero (per token)
            NGV: tl.constexpr = BLOCK_D // GV
            if VT > 0:  # token-blocked values: a [D, N] tile unpacked along the dot's depth (tokens)
                vcode = _unpack_tokens(vc, d, dmask, t0, end, svc_t, D, BLOCK_N, VW0, VW1, VT, ASM)
            else:
                vcode = _unpack(vc, t, tmask, svc_t, D, BLOCK_D, VW0, VW1, ASM, UNPACK3_V, VWORDS, _ROW_UNITS3)
            if NGV == 1:
                s_v = tl.load(vs + t.to(tl.int64) * svs_t, mask=tmask, other=0.0).to(tl.float32)
                z_v = tl.load(vz + t.to(tl.int64) * svs_t, mask=tmask, other=0.0).to(tl.float32)
                if FOLD_V == 0:  # dequantize the tile in fp16 registers
                    v = vcode * _vtok(s_v.to(tl.float16), VT > 0) + _vtok(z_v.to(tl.float16), VT > 0)
                    acc += _pv_tile(p, v, SWAP_QK, SWAP_PV, VT > 0)
                elif FOLD_V == 1:
                    sv_max = tl.maximum(tl.max(s_v, axis=0), 1e-30)
                    pv = _pv_tile(p * _tok(s_v / sv_max, SWAP_QK), vcode, SWAP_QK, SWAP_PV, VT > 0)
                    pz = tl.sum(p * _tok(z_v, SWAP_QK), axis=TOK)
                    acc += pv * sv_max + _head(pz, SWAP_PV)
                else:
                    pv = _pv_tile(p * _tok(s_v, SWAP_QK), vcode, SWAP_QK, SWAP_PV, VT > 0)
                    pz = tl.sum(p * _tok(z_v, SWAP_QK), axis=TOK)
                    acc += pv + _head(pz, SWAP_PV)
            else:
                if VT > 0:
                    v = _dequant_groups_t(vcode, vs, vz, t, tmask, svs_t, D, GV, NGV, BLOCK_N, BLOCK_D, DQ16)
                else:
                    v = _dequant_groups(vcode, vs, vz, t, tmask, svs_t, D, GV, NGV, BLOCK_N, BLOCK_D, DQ16)
                acc += _pv_tile(p, v, SWAP_QK, SWAP_PV, VT > 0)
    else:
        kr = KR + b * skr_b + h * skr_h
        vr = VR + b * svr_b + h * svr_h
        for r0 in range(0, n_r, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rmask = r < n_r
            lm = rmask[:, None] & dmask[None, :]
            # fp16 operands, fp32 accumulation, like the quantized tiles (an fp32 dot costs registers)
            k = tl.load(kr + r.to(tl.int64)[:, None] * skr_t + d[None, :], mask=lm, other=0.0).to(tl.float16)
            v = tl.load(vr + r.to(tl.int64)[:, None] * svr_t + d[None, :], mask=lm, other=0.0).to(tl.float16)
            scores = _qk(q.to(tl.float16), k, SWAP_QK)
            valid = rmask
            if HAS_MASK:
                mk = tl.load(MASK + b * smask_b + n_q + r, mask=rmask, other=0)
                valid = valid & (mk != 0)
            m_i, l_i, acc, p = _softmax_step(scores, valid, m_i, l_i, acc, SWAP_QK, SWAP_PV)
            acc += _pv(p, v, SWAP_QK, SWAP_PV)

    hq = (h * GROUP + hrow).to(tl.int64)
    row = (b * (HKV * GROUP) + hq) * NUM_SPLITS + split
    if SWAP_PV:
        tl.store(PO + row[None, :] * BLOCK_D + d[:, None], acc, mask=hmask[None, :])
    else:
        tl.store(PO + row[:, None] * BLOCK_D + d[None, :], acc, mask=hmask[:, None])
    tl.store(PM + row, m_i, mask=hmask)
    tl.store(PL + row, l_i, mask=hmask)


@triton.jit(do_not_specialize=["NUM_SPLITS"])
def _merge_kernel(PO, PM, PL, O, so_b, so_h, HQ, NUM_SPLITS, out_scale, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_S: tl.constexpr, ROT_O: tl.constexpr = False, LOG_D: tl.constexpr = 0):
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    h = (pid % HQ).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    smask = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    base = (b * HQ + h) * NUM_SPLITS
    m = tl.load(PM + base + s, mask=smask, other=float("-inf"))
    l_s = tl.load(PL + base + s, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    acc = tl.load(PO + (base + s)[:, None] * BLOCK_D + d[None, :], mask=smask[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(l_s * w, axis=0)
    out = num * out_scale / tl.where(den > 0, den, 1.0)
    if ROT_O:  # values stored as v H: o = (o H) H = (o H) S / sqrt(D), the 1/sqrt(D) being out_scale
        out = tl.reshape(_hadamard_rows(tl.reshape(out, (1, BLOCK_D)), LOG_D), (BLOCK_D,))
    tl.store(O + b * so_b + h * so_h + d, out.to(O.dtype.element_ty), mask=d < D)


# the two kernels run once per layer and decode step: skip Triton's per-call re-specialisation
_launch_split = CachedLauncher(_decode_split_kernel)
_launch_merge = CachedLauncher(_merge_kernel)

_DUMMIES: dict = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element stand-in for pointer arguments the launch does not read (kept, not reallocated)."""
    key = (device, dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.empty(1, device=device, dtype=dtype)
    return _DUMMIES[key]


@functools.cache
def _num_sm_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sm(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return _num_sm_of(device.index if device.index is not None else torch.cuda.current_device())


def _splits(batch_heads: int, n_q: int, block_n: int, device: torch.device, per_sm: int = 4,
            fit: int | None = None) -> tuple[int, int]:
    """(quantized splits, tokens per split): about ``per_sm`` programs per SM, whole tiles per split.

    With fewer rows (batch x KV heads) than SMs the split count per row rounds down, so that the
    programs never exceed ``per_sm`` per SM: rounding up put B = 16 (128 rows on 132 SMs) at
    ``per_sm + 1`` splits per row, a second wave of programs for the few that did not fit (H100, 16 x
    32k, G = 128: KV4 443 -> 341 µs, KV2 475 -> 344; benchmarks/results/kernel_experiments_h100.md,
    session 16). Where a row needs many splits (B = 1) the two roundings differ by one split in about
    50, which whole tiles absorb. The table's ``splits_per_sm_small`` is therefore the number of
    programs that fit per SM (4 at 128 registers, 3 at 168) or a multiple of it.

    With as many rows as SMs or more, ``fit`` (programs per SM under the launch's register cap) lets
    :func:`_whole_waves` move the count to one that fills whole waves: the many-row splits were
    measured at B = 64 and left a partial last wave at other batch sizes.
    """
    tiles = -(-n_q // block_n)
    if tiles == 0:
        return 0, block_n
    sms = _num_sm(device)
    slots = per_sm * sms
    want = max(1, slots // batch_heads if batch_heads < sms else -(-slots // batch_heads))
    if fit and batch_heads >= sms:  # programs that fit per SM known: prefer a count that fills whole waves
        want = _whole_waves(batch_heads, tiles, want, fit * sms)
    per = -(-tiles // min(want, tiles))
    return -(-tiles // per), per * block_n


def programs_per_sm(maxnreg: int, num_warps: int) -> int:
    """Programs of ``num_warps`` warps capped at ``maxnreg`` registers that fit on an SM (65,536 registers).

    Shared memory is not counted: every capped launch-table entry is register-bound (e.g. KV8 at 168
    registers and 72 KB: 3 programs either way)."""
    return 65536 // (maxnreg * 32 * num_warps)


@functools.lru_cache(maxsize=4096)  # on the decode path per layer and step; its arguments change per tile
def _whole_waves(rows: int, tiles: int, want: int, slots: int) -> int:
    """The split count per row near ``want`` whose programs fill whole waves of ``slots`` best.

    Time per row ~ waves x tokens per split ~ ceil(rows x s / slots) / s. A count moves only when
    that is 3 % better, and then to the best count up to ``2 want + 1`` (the nearest to ``want`` on
    ties): the table's splits were measured with ``want``, which the model cannot rank among equals.
    Only up to 2.5 waves: with more, moving measured 1-7 % slower (H100, B = 64 and 128 at G = 32),
    and from 1 to 2.5 waves 5-26 % faster (B = 24-96; kernel_experiments_h100.md, session 16).
    """
    def count(s: int) -> int:  # whole tiles per split: the split count really launched
        return -(-tiles // -(-tiles // s))

    def cost(s: int) -> float:
        return -(-rows * count(s) // slots) / count(s)

    if rows * count(want) > 2.5 * slots:
        return want
    best = min(range(1, min(2 * want + 1, tiles) + 1), key=lambda s: (cost(s), abs(s - want)))
    return best if cost(best) < 0.97 * cost(want) else want


def _ptx_ok(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


LAUNCH_TABLE = Path(__file__).with_name("launch_table.json")


LAYOUTS = ("", "tokens", "groups")


@functools.cache
def launch_table() -> dict[tuple[int, int, str], dict]:
    """Measured launch choices per (k_bits, v_bits, layout) at D = 128 (``launch_table.json``: keys
    ``"k,v"`` for 128-token tiles of one key group, ``"k,v,tokens"`` for token-blocked values,
    ``"k,v,groups"`` for key groups shorter than the tile, e.g. KIVI G = 32; layout ``""``,
    ``"tokens"``, ``"groups"``); empty if absent."""
    if not LAUNCH_TABLE.is_file():
        return {}
    pairs = json.loads(LAUNCH_TABLE.read_text())["pairs"]
    out = {}
    for key, entry in pairs.items():
        k, v, *layout = key.split(",")
        name = ",".join(layout)
        if name not in LAYOUTS:
            raise ValueError(f"launch table key {key!r} is invalid; allowed: 'k,v', 'k,v,tokens' or 'k,v,groups'")
        out[int(k), int(v), name] = entry
    return out


def default_block_n(kbits: int, vbits: int, block_d: int, key_group: int | None, value_block: int = 0) -> int:
    """Tokens per tile when the caller gives none. ``key_group``: tokens per key group (per-channel
    keys), ``None`` for per-token keys; ``value_block``: the values' token block (0: none).

    Token-blocked values: one block per tile. Key groups shorter than 128 tokens that divide it
    (KIVI G = 32, the plans' default) at head_dim <= 128: 128-token tiles over several groups
    (the ``"groups"`` table entry's ``block_n``; without one, 64 for 8-bit keys, whose 128-token
    tile spilled, else 128). H100, 64 x 4k, graph µs: K4V2 351 -> 213, K2V2 361 -> 213, K4V4 348
    -> 264, K8V8 573 -> 317 against one group per tile (benchmarks/results/kernel_experiments_h100.md,
    session 14). Otherwise one key group per tile (at least 32 tokens), or 64.
    """
    if value_block:
        return value_block
    if key_group is not None and key_group < 128 and 128 % key_group == 0 and block_d <= 128:
        entry = launch_table().get((kbits, vbits, "groups"), {})
        return entry.get("block_n", 64 if kbits == 8 else 128)
    return key_group if key_group is not None and key_group >= 32 else 64


def launch_defaults(kbits: int, vbits: int, block_d: int, block_n: int, device: torch.device, *,
                    table: bool = True, layout: str = "") -> dict:
    """Launch choices per bit pair: rules from the H100 sweeps, then the measured table's entry.

    Rules (benchmarks/results/decode_kernel_sweep_h100.md, sweep_fold_h100.md):

    * ``acc^T = V^T P^T`` (swap_pv) for 2- and 4-bit values (with 8-bit values it spills, with
      bit-plane 3-bit values it was slower); ``S^T = K q^T`` (swap_qk) never: together with swap_pv
      Triton 3.6 produced wrong results or illegal memory accesses, and alone it was slower;
    * packed PTX unpacking (asm) where available; 4 warps, 3 stages;
    * 3-bit keys unpacked by 8-channel word, both planes per PTX call (``unpack3_k="words"``:
      K3V4 244 vs 301 µs plane by plane, K3V2 236 vs 286); 3-bit values plane by plane
      (``unpack3_v="planes"``: by word or byte + nibble they were 5-25 % slower, the latter from
      register pressure; benchmarks/results/kernel_experiments_h100.md);
    * key scales folded into q without a max-normalisation (``plain``) below 8 bits, dequantized in
      registers (``reg``) at 8 bits; value scales dequantized in registers below 8 bits. The
      max-normalised folds cost two cross-warp reductions per tile: 20-25 % of the time.

    The table (measured at D = 128, 128-token tiles) overrides every choice for that tile shape and
    the fold choices for any shape; PTX unpacking stays off where it cannot run. Its
    ``splits_per_sm_small``, ``maxnreg_small`` and ``num_stages_small`` (measured at B = 1, L = 128k)
    replace ``splits_per_sm``, ``maxnreg`` and ``num_stages`` when there are fewer (batch x KV head)
    rows than SMs (few long rows need fewer programs per SM, so a register cap that buys occupancy at
    B = 64 only adds spills there; KIVI G = 32 KV4 ran 3 stages faster at B = 64, 2 at B = 1).

    ``layout`` (one of :data:`LAYOUTS`): ``"tokens"``, values in token blocks (``quant.to_token_blocks``);
    their own entry if the table has one, else the pair's entry; swap_pv always (without it every
    token-blocked pair was 20-60 % slower: benchmarks/results/kernel_experiments_h100.md, session 11).
    ``"groups"``: several key groups per tile (:func:`default_block_n`); their own entry if the table
    has one, else the pair's entry. Tiles of several key groups, and values in several groups per
    token, dequantize in fp16 registers (``dq16``; in fp32: 0-5 % slower with 32-token tiles at
    G = 32, and 128-token tiles spilled).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid; allowed: {LAYOUTS}")
    return dict(_launch_defaults(kbits, vbits, block_d, block_n, _ptx_ok(device), table, layout))


@functools.lru_cache(maxsize=512)  # on the decode path once per layer and step: build each dict once
def _launch_defaults(kbits: int, vbits: int, block_d: int, block_n: int, ptx: bool, table: bool,
                     layout: str = "") -> dict:
    out = dict(num_warps=4, num_stages=3 if block_d * block_n <= 128 * 128 else 2,
               swap_qk=False, swap_pv=vbits in (2, 4) or layout == "tokens", asm=ptx,
               fold_k="reg" if kbits == 8 else "plain", fold_v="norm" if vbits == 8 else "reg",
               maxnreg=None, splits_per_sm=4, splits_per_sm_small=None, maxnreg_small=None, num_stages_small=None,
               unpack3_k="words" if ptx else "planes", unpack3_v="planes", dq16=True)
    entries = launch_table() if table else {}
    entry = entries.get((kbits, vbits, layout)) or entries.get((kbits, vbits, ""))
    if entry:
        same_tile = block_d == 128 and block_n == entry.get("block_n", 128)
        out.update({k: v for k, v in entry.items() if k in out and (same_tile or k in ("fold_k", "fold_v"))})
        if not ptx:  # PTX unpacking and register caps only exist on the GPU
            out.update(asm=False, maxnreg=None, maxnreg_small=None, unpack3_k="planes", unpack3_v="planes")
    return out


_SMALL = ("splits_per_sm", "maxnreg", "num_stages")  # each may have a "<name>_small" entry for few long rows
_GIVEN = ("num_warps", "num_stages", "swap_qk", "swap_pv", "asm", "fold_k", "fold_v", "maxnreg", "splits_per_sm",
          "unpack3_k", "unpack3_v", "dq16")


@functools.lru_cache(maxsize=1024)  # once per layer and step: decide and validate once per configuration
def _launch_choices(kbits: int, vbits: int, block_d: int, block_n: int, ptx: bool, small: bool,
                    given: tuple, layout: str = "") -> tuple:
    """The launch choices in ``_GIVEN`` order: the defaults, with the split for few long rows when
    ``small``, overridden by the non-``None`` values of ``given``."""
    launch = dict(_launch_defaults(kbits, vbits, block_d, block_n, ptx, True, layout))
    if small:  # few long rows: their own measured split, register cap and stages
        for name in _SMALL:
            launch[name] = launch[name + "_small"] or launch[name]
    launch.update({k: v for k, v in zip(_GIVEN, given) if v is not None})
    for name, allowed in (("fold_k", FOLDS), ("fold_v", FOLDS), ("unpack3_k", UNPACK3), ("unpack3_v", UNPACK3)):
        if launch[name] not in allowed:
            raise ValueError(f"{name}={launch[name]!r} is invalid; allowed: {sorted(allowed)}")
    if launch["swap_qk"] and launch["swap_pv"]:
        raise ValueError("swap_qk=True with swap_pv=True is invalid; allowed: at most one (Triton 3.6 miscompiles "
                         "the pair: wrong results or illegal memory accesses on an H100)")
    if launch["asm"] and not ptx:
        raise ValueError("asm=True needs a CUDA device outside Triton's interpreter (inline PTX)")
    return tuple(launch[k] for k in _GIVEN)


def _pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (``triton.next_power_of_2`` without its constexpr wrapper,
    which cost ~5 µs per call on the decode path)."""
    return 1 << (x - 1).bit_length() if x > 1 else 1


FOLDS = {"reg": 0, "norm": 1, "plain": 2}  # how a scale/zero reaches the dot (kernel constexpr FOLD_K/FOLD_V)
# how 3-bit codes are unpacked with PTX (kernel constexpr UNPACK3_K/UNPACK3_V): plane by plane, both
# planes per 8-channel word (head_dim % 16 == 0), or per 4-channel byte + nibble (head_dim % 8 == 0)
UNPACK3 = {"planes": 0, "words": 1, "nibbles": 2}


def decode_attention(q: torch.Tensor, k_packed: QuantizedTensor | None, k_residual: torch.Tensor | None,
                     v_packed: QuantizedTensor | None, v_residual: torch.Tensor | None, scaling: float,
                     kv_mask: torch.Tensor | None = None, out_scale: float = 1.0, *, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None, swap_qk: bool | None = None,
                     swap_pv: bool | None = None, asm: bool | None = None, fold_k: str | None = None,
                     fold_v: str | None = None, maxnreg: int | None = None,
                     splits_per_sm: int | None = None, unpack3_k: str | None = None, unpack3_v: str | None = None,
                     lengths: torch.Tensor | None = None, rotate_q: bool = False,
                     rotate_out: bool = False, dq16: bool | None = None) -> torch.Tensor:
    """Fused kernel; see :func:`kvtuner.attention.decode_attention` for the contract.

    Keys and values must be in step (same quantized token count), as in every plan whose key and
    value specs share mode, group and residual window. The keyword-only arguments override the
    launch choices (tile, warps, stages, MMA orientation, PTX unpacking, how scales reach the dots,
    register cap, split count, fp16 or fp32 dequantization of multi-group tiles: ``dq16``) for
    benchmarks; ``None`` takes the measured default
    (:func:`launch_defaults`).

    ``lengths`` (CUDA-graph replay): an int32/int64 device tensor ``[quantized tokens / unit, residual
    tokens]`` read by the kernel, with ``unit = length_unit(k_packed)``. The packed tensors and the
    residuals are then whole buffers (capacity), of which only the counted tokens are read, and
    ``kv_mask`` (if any) is indexed by absolute position (quantized tokens, then the residual), so
    it needs ``quantized capacity + residual capacity`` columns. Launch
    arguments then depend only on capacities, so one captured launch serves every step.

    ``rotate_q`` / ``rotate_out``: multiply the query by / the output by the ``±1`` Hadamard matrix
    ``S`` in the kernels (a fast Walsh-Hadamard transform in registers), for layers whose keys /
    values are stored rotated, with the ``1/sqrt(D)`` factors in ``scaling`` and ``out_scale``.
    :func:`kvtuner.attention.rotated_decode` uses ``rotate_out`` (the merge kernel); ``rotate_q``
    in the split kernel measured 7-16 % slower for the register-capped pairs (H100, session 11),
    so the query keeps its matmul there. head_dim must be a power of two.
    """
    if (rotate_q or rotate_out) and (q.shape[-1] & (q.shape[-1] - 1)):
        raise ValueError(f"rotate_q/rotate_out need a power-of-two head_dim; got {q.shape[-1]}")
    b, hq, one, d = q.shape
    if lengths is not None and (k_packed is None or v_packed is None or k_residual is None or v_residual is None):
        raise ValueError("lengths= needs packed and residual buffers for keys and values (capacity views)")
    if lengths is not None and (lengths.dtype not in (torch.int32, torch.int64) or lengths.numel() != 2
                                or lengths.device != q.device):
        raise ValueError(f"lengths must be 2 int32/int64 values on {q.device}; got {lengths.dtype} x "
                         f"{lengths.numel()} on {lengths.device}")
    if one != 1:
        raise ValueError(f"q.shape[2]={one} is invalid; allowed: 1 (one decode token per sequence)")
    n_q = 0 if k_packed is None else k_packed.num_tokens
    n_qv = 0 if v_packed is None else v_packed.num_tokens
    if lengths is not None:  # capacities: key buffers round up to whole groups, value buffers need not
        n_q = n_qv = min(n_q, n_qv)
    if n_q != n_qv:
        raise ValueError(f"quantized key/value token counts {n_q} and {n_qv} differ; allowed: equal (keys and "
                         "values flushed in step)")
    ref = k_residual if k_residual is not None else k_packed.scale
    hkv = ref.shape[1]
    n_r = 0 if k_residual is None else k_residual.shape[-2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {hkv}; allowed: a multiple")
    group = hq // hkv
    block_d = _pow2(d)
    dummy, dummy_f = _dummy(q.device, torch.uint8), _dummy(q.device, q.dtype)
    if n_q:
        kc, ks, kz, vc, vs, vz = (k_packed.codes, k_packed.scale, k_packed.zero, v_packed.codes, v_packed.scale,
                                  v_packed.zero)
        kbits, vbits = k_packed.bits, v_packed.bits
        k_per_channel = k_packed.granularity == "per_channel"
        gk, gv = k_packed.group_size, v_packed.group_size
        if v_packed.granularity != "per_token":
            raise ValueError("values must be quantized per token")
        if not k_per_channel and (d % gk or block_d != d) and gk != d:
            raise ValueError(f"per-token key groups of {gk} channels need head_dim a power of two multiple")
        if (gv != d and (d % gv or block_d != d)):
            raise ValueError(f"value groups of {gv} channels need head_dim a power of two multiple")
        vt, kwords = v_packed.token_block, k_packed.channel_words
        vwords = v_packed.channel_words
        if vwords and (vbits != 3 or v_packed.token_block):
            raise ValueError(f"{vbits}-bit values in channel word order are not read by the kernel; allowed: keys, "
                             "and 3-bit values packed along head_dim (contiguous words)")
        if vt and (d % 8 or vt % 32):
            raise ValueError(f"token-blocked values need head_dim a multiple of 8 and the block ({vt}) of 32")
        gk_eff = block_d if (not k_per_channel and gk == d) else gk
        gv_eff = block_d if gv == d else gv
    else:
        kc = ks = kz = vc = vs = vz = None
        kbits = vbits = 8
        k_per_channel, gk_eff, gv_eff, vt, kwords, vwords = True, 32, block_d, 0, False, False
    if block_n is None:  # an empty history runs only the residual split: its placeholder bits/group pick no entry
        block_n = default_block_n(kbits, vbits, block_d, gk_eff if k_per_channel else None, vt) if n_q else gk_eff
    if k_per_channel and block_n % gk_eff and gk_eff % block_n:
        raise ValueError(f"block_n={block_n} is invalid; allowed: a multiple or divisor of the key group {gk_eff}")
    if vt and block_n != vt:
        raise ValueError(f"block_n={block_n} is invalid for values in token blocks of {vt}; allowed: {vt}")
    ptx = _ptx_ok(q.device)
    given = (num_warps, num_stages, swap_qk, swap_pv, asm, fold_k, fold_v, maxnreg, splits_per_sm, unpack3_k, unpack3_v,
             dq16)
    (num_warps, num_stages, swap_qk, swap_pv, asm, fold_k, fold_v, maxnreg, splits_per_sm, unpack3_k,
     unpack3_v, dq16) = _launch_choices(kbits, vbits, block_d, block_n, ptx, b * hkv < _num_sm(q.device), given,
                                        "tokens" if vt else "groups" if k_per_channel and block_n > gk_eff else "")
    fit = programs_per_sm(maxnreg, num_warps) if maxnreg else None
    n_split_q, per_split = _splits(b * hkv, n_q, block_n, q.device, splits_per_sm, fit)
    num_splits = n_split_q + 1
    rows = b * hq * num_splits
    partial = torch.empty(rows * (block_d + 2), device=q.device, dtype=torch.float32)  # one allocation
    po, pm, pl = partial[: rows * block_d].view(rows, block_d), partial[rows * block_d:][:rows], partial[-rows:]

    def st(t, n=3):
        return tuple(t.stride()[:n]) if t is not None else (0,) * n

    kr = k_residual if n_r else None
    vr = v_residual if n_r else None
    mask = kv_mask.to(torch.uint8) if kv_mask is not None else None
    kw, vw = (*PLANES[kbits], 0)[:2], (*PLANES[vbits], 0)[:2]  # bit planes, compile-time constants
    global last_compiled
    last_compiled = _launch_split((b * hkv, num_splits),
        q, kc if kc is not None else dummy, ks if ks is not None else dummy_f, kz if kz is not None else dummy_f,
        vc if vc is not None else dummy, vs if vs is not None else dummy_f, vz if vz is not None else dummy_f,
        kr if kr is not None else dummy_f, vr if vr is not None else dummy_f, mask if mask is not None else dummy,
        lengths if lengths is not None else dummy, po, pm, pl,
        q.stride(0), q.stride(1),
        *st(kc), *st(ks), *st(vc), *st(vs), *st(kr), *st(vr),
        mask.stride(0) if mask is not None else 0,
        n_q, n_r, per_split, n_split_q, float(scaling) * LOG2E, hkv, group, num_splits,
        BLOCK_H=max(16, _pow2(group)), D=d, BLOCK_D=block_d,
        KW0=kw[0], KW1=kw[1], VW0=vw[0], VW1=vw[1], K_PER_CHANNEL=k_per_channel, GK=gk_eff, GV=gv_eff, BLOCK_N=block_n,
        BLOCK_R=32, HAS_MASK=mask is not None, SWAP_QK=bool(swap_qk), SWAP_PV=bool(swap_pv), ASM=bool(asm),
        FOLD_K=FOLDS[fold_k], FOLD_V=FOLDS[fold_v], DEV_LEN=lengths is not None,
        QUNIT=length_unit(k_packed) if lengths is not None else 1, UNPACK3_K=UNPACK3[unpack3_k] if asm else 0,
        UNPACK3_V=UNPACK3[unpack3_v] if asm else 0, VT=vt, KWORDS=kwords, VWORDS=vwords, ROT_Q=bool(rotate_q),
        LOG_D=block_d.bit_length() - 1, DQ16=bool(dq16), num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    out = torch.empty(b, 1, hq, d, device=q.device, dtype=q.dtype)
    _launch_merge((b * hq,), po, pm, pl, out, out.stride(0), out.stride(2), hq, num_splits, float(out_scale), D=d,
                  BLOCK_D=block_d, BLOCK_S=max(2, _pow2(num_splits)), ROT_O=bool(rotate_out),
                  LOG_D=block_d.bit_length() - 1)
    return out


def max_int32_offset(batch: int, heads: int, tokens: int, row_bytes: int) -> bool:
    """Whether the largest byte offset of a ``[batch, heads, tokens, row_bytes]`` buffer passes int32
    (the kernel then relies on its int64 offsets)."""
    return batch * heads * tokens * row_bytes - 1 > 2**31 - 1


decode_attention.fuses_rotation = True  # rotated_decode hands it the output's Hadamard transform

__all__ = ["decode_attention", "max_int32_offset"]
