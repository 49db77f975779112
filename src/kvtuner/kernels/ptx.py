"""Inline PTX that turns packed codes into fp16 values, four bytes per call.

Bytes are spread into the low halves of fp16x2 lanes with ``prmt``, masked and OR-ed with the exponent
``0x6400`` in one ``lop3`` (fp16 value ``1024 + code << shift``), then scaled back to the code with one
packed ``sub``/``fma``. The strings are ``tl.constexpr`` so that ``tl.inline_asm_elementwise`` in the
jitted helpers of :mod:`.unpack` can take them.
"""

from __future__ import annotations

import torch
import triton.language as tl

ASM8 = tl.constexpr("""{
.reg .b32 m;
mov.b32 m, 0x64006400;
prmt.b32 $0, $2, 0x64646464, 0x4140;
prmt.b32 $1, $2, 0x64646464, 0x4342;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
}""")
ASM4 = tl.constexpr("""{
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
ASM2 = tl.constexpr("""{
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


def asm1_times4() -> str:
    """PTX for a 1-bit plane, each bit already multiplied by 4 (the 1-bit plane of a 3-bit code sits
    above a 2-bit plane): bit k becomes fp16 1024 + 2^k, then ``* 2^(2-k) - 1024 * 2^(2-k)``."""
    lines = ["{", ".reg .b32 t0, t1, m, s, o;", "prmt.b32 t0, $16, 0, 0x4140;", "prmt.b32 t1, $16, 0, 0x4342;",
             "mov.b32 m, 0x64006400;"]
    for k in range(8):
        scale, off = 2.0 ** (2 - k), -1024 * 2.0 ** (2 - k)
        lines += [f"mov.b32 s, {f16x2(scale)};", f"mov.b32 o, {f16x2(off)};"]
        for j, t in enumerate(("t0", "t1")):
            r = f"${2 * k + j}"
            lines += [f"lop3.b32 {r}, {t}, 0x{1 << k:04x}{1 << k:04x}, m, 0xea;", f"fma.rn.f16x2 {r}, {r}, s, o;"]
    return "\n".join(lines + ["}"])


def f16x2(x: float) -> str:
    """A PTX immediate holding ``x`` as fp16 in both halves of a 32-bit register."""
    h = int(torch.tensor(x, dtype=torch.float16).view(torch.int16).item()) & 0xFFFF
    return f"0x{h:04x}{h:04x}"


def asm3() -> str:
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
        lines += [f"mov.b32 sh, {f16x2(sh)};", f"mov.b32 sl, {f16x2(sl)};", f"mov.b32 c, {f16x2(-1024 * (sh + sl))};",
                  f"lop3.b32 t, h, 0x{1 << k:04x}{1 << k:04x}, m, 0xea;",
                  "fma.rn.f16x2 t, t, sh, c;",
                  f"lop3.b32 ${k}, {'l0' if k < 4 else 'l1'}, 0x{3 << 2 * j:04x}{3 << 2 * j:04x}, m, 0xea;",
                  f"fma.rn.f16x2 ${k}, ${k}, sl, t;"]
    return "\n".join(lines + ["}"])


def asm3_nibble() -> str:
    """PTX for 3-bit codes from 16-bit elements ``e = low-plane byte | high-plane nibble << 8`` (4
    channels; code k's low bits at bit 2k, its high bit at 8 + k), two elements per call (fp16x2
    lanes); output k = code k of each element. After ``y = e >> 4`` the high bit sits at mantissa
    bit 4 + k: ``t = (1024 + h 2^(4+k)) 2^(-2-k) - 1024 (2^(-2-k) + 4^-k) = 4h - 1024 4^-k``, then
    ``out = (1024 + l 4^k) 4^-k + t = l + 4h`` (two lop3 and two packed FMAs, exact in fp16)."""
    lines = ["{", ".reg .b32 y, m, sh, sl, c, t;", "shr.b32 y, $4, 4;", "mov.b32 m, 0x64006400;"]
    for k in range(4):
        sh, sl = 2.0 ** (-2 - k), 4.0 ** -k
        lines += [f"mov.b32 sh, {f16x2(sh)};", f"mov.b32 sl, {f16x2(sl)};", f"mov.b32 c, {f16x2(-1024 * (sh + sl))};",
                  f"lop3.b32 t, y, 0x{1 << 4 + k:04x}{1 << 4 + k:04x}, m, 0xea;", "fma.rn.f16x2 t, t, sh, c;",
                  f"lop3.b32 ${k}, $4, 0x{3 << 2 * k:04x}{3 << 2 * k:04x}, m, 0xea;", f"fma.rn.f16x2 ${k}, ${k}, sl, t;"]
    return "\n".join(lines + ["}"])


def asm3_pairs() -> str:
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
            lines += to_code(r, 4.0 ** -f)
    return "\n".join(lines + ["}"])


def to_code(r: str, scale: float) -> list[str]:
    """PTX turning fp16 ``1024 + c / scale`` in both lanes of ``r`` into ``c``: one ``sub`` of ``m``
    (``0x64006400``) where ``scale == 1``, else one packed FMA by ``scale`` (registers ``s``, ``o``)."""
    if scale == 1:
        return [f"sub.f16x2 {r}, {r}, m;"]
    return [f"mov.b32 s, {f16x2(scale)};", f"mov.b32 o, {f16x2(-1024 * scale)};", f"fma.rn.f16x2 {r}, {r}, s, o;"]


def asm3_contiguous() -> str:
    """PTX for 3-bit codes stored contiguously (``quant.to_channel_words``, 3 bits): input word ``w`` =
    the 24 bits of 8 channels, code ``k`` at bits ``3k .. 3k + 2``; two words per call (fp16x2 lanes:
    lane 0 from ``$8``, lane 1 from ``$9``); output ``k`` = code ``k``.

    Three byte moves put the 16 bits starting at bit 0, 8 and 16 of each word into its lane, so that
    every code lies whole inside the fp16 mantissa (codes 0-2 at bits 0, 3, 6; codes 3-5 at 1, 4, 7;
    codes 6-7 at 2, 5); then one ``lop3`` (mask and exponent ``0x6400``: fp16 ``1024 + c 2^s``) and one
    packed ``fma`` by ``2^-s`` (``sub`` for ``s = 0``) per output: 2 instructions per 2 codes, against
    4 for the two planes (:func:`asm3`)."""
    lines = ["{", ".reg .b32 x0, x1, x2, m, s, o;", "mov.b32 m, 0x64006400;",
             "prmt.b32 x0, $8, $9, 0x5410;", "prmt.b32 x1, $8, $9, 0x6521;", "prmt.b32 x2, $8, $9, 0x7632;"]
    for k in range(8):
        src, shift = (("x0", 3 * k) if k < 3 else ("x1", 3 * k - 8) if k < 6 else ("x2", 3 * k - 16))
        mask = 7 << shift
        lines += [f"lop3.b32 ${k}, {src}, 0x{mask:04x}{mask:04x}, m, 0xea;", *to_code(f"${k}", 2.0 ** -shift)]
    return "\n".join(lines + ["}"])


def asm3_token_pairs() -> str:
    """PTX for 3-bit values as bit planes in token pairs (``quant.in_token_pairs``), two operands: ``$8`` the
    2-bit plane's bytes ``[b0 t0, b0 t1, b1 t0, b1 t1]`` (codes of channels ``4 b .. 4 b + 3`` of two tokens, as
    :data:`ASM2` takes them), ``$9`` the 1-bit plane's byte of those 8 channels per token in its bytes 0 and 1
    (bits 0-3: the high bits of byte b0's codes, bits 4-7: b1's; bytes 2 and 3 unused). Output ``2 f + j``
    holds code ``f`` of byte ``b_j`` of both tokens, exact: the high bit is moved next to the low bits (bit
    ``2 f + 2`` of each half), the three bits become fp16 ``1024 + c << 2 f``, one packed fma removes the
    offset and the shift."""
    lines = ["{", ".reg .b32 t0, t1, h, u, m, s, o;", "prmt.b32 t0, $8, 0, 0x4140;", "prmt.b32 t1, $8, 0, 0x4342;",
             "prmt.b32 h, $9, 0, 0x4140;", "mov.b32 m, 0x64006400;"]
    for f in range(4):
        for j in range(2):
            out, shift = f"${2 * f + j}", f + 2 - 4 * j  # bit 4 j + f of the plane byte -> bit 2 f + 2
            src = "h"
            if shift:
                lines.append(f"{'shl' if shift > 0 else 'shr'}.b32 u, h, {abs(shift)};")
                src = "u"
            lines.append(f"lop3.b32 u, {src}, {hex((4 << 2 * f) * 0x10001)}, m, 0xea;")
            lines.append(f"lop3.b32 {out}, t{j}, {hex((3 << 2 * f) * 0x10001)}, u, 0xea;")
            if f == 0:
                lines.append(f"sub.f16x2 {out}, {out}, m;")
            else:
                if j == 0:  # fma takes registers only
                    lines += [f"mov.b32 s, {f16x2(2.0 ** (-2 * f))};", f"mov.b32 o, {f16x2(-1024 * 2.0 ** (-2 * f))};"]
                lines.append(f"fma.rn.f16x2 {out}, {out}, s, o;")
    return "\n".join(lines + ["}"])

ASM3C = tl.constexpr(asm3_contiguous())
ASM3TP = tl.constexpr(asm3_token_pairs())
ASM3P = tl.constexpr(asm3_pairs())
# 8-channel words of a 3-bit row per thread (:func:`_unpack3_asm`): values packed along head_dim are
# transposed through shared memory, and with a whole row per thread each fp16 went there alone (STS.U16)
ROW_UNITS3 = tl.constexpr(4)
ASM1X4 = tl.constexpr(asm1_times4())
ASM3N = tl.constexpr(asm3_nibble())
ASM3 = tl.constexpr(asm3())
ASM3_CONSTRAINTS = tl.constexpr("=r," * 8 + "r,r")
ASM1_CONSTRAINTS = tl.constexpr("=r," * 16 + "r")



# Codes as fp16 ``1024 + code << shift`` with nothing subtracted (two bytes per fp16x2 lane pair, as above):
# where the MMA's other operand carries ``1 / 2^shift`` and a bias MMA removes the 1024, a code costs its
# share of one ``prmt`` and one ``lop3``.
RAW8 = tl.constexpr("""{
prmt.b32 $0, $2, 0x64646464, 0x4140;
prmt.b32 $1, $2, 0x64646464, 0x4342;
}""")
RAW4 = tl.constexpr("""{
.reg .b32 t0, t1;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 $0, t0, 0x000f000f, 0x64006400, 0xea;
lop3.b32 $1, t1, 0x000f000f, 0x64006400, 0xea;
lop3.b32 $2, t0, 0x00f000f0, 0x64006400, 0xea;
lop3.b32 $3, t1, 0x00f000f0, 0x64006400, 0xea;
}""")
RAW2 = tl.constexpr("""{
.reg .b32 t0, t1;
prmt.b32 t0, $8, 0, 0x4140;
prmt.b32 t1, $8, 0, 0x4342;
lop3.b32 $0, t0, 0x00030003, 0x64006400, 0xea;
lop3.b32 $1, t1, 0x00030003, 0x64006400, 0xea;
lop3.b32 $2, t0, 0x000c000c, 0x64006400, 0xea;
lop3.b32 $3, t1, 0x000c000c, 0x64006400, 0xea;
lop3.b32 $4, t0, 0x00300030, 0x64006400, 0xea;
lop3.b32 $5, t1, 0x00300030, 0x64006400, 0xea;
lop3.b32 $6, t0, 0x00c000c0, 0x64006400, 0xea;
lop3.b32 $7, t1, 0x00c000c0, 0x64006400, 0xea;
}""")
# the transpose of an 8x8 fp16 block held one row pair per thread (MMA accumulator -> B operand)
MOVMATRIX_T = tl.constexpr("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;")
