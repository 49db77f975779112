"""Jitted helpers that load packed codes and turn them into fp16 tiles (bit planes, channel words, token
blocks; ``quant.py`` documents the layouts), and that apply scales and zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ptx import ASM1_CONSTRAINTS, ASM1X4, ASM2, ASM3, ASM3_CONSTRAINTS, ASM3C, ASM3N, ASM3P, ASM4, ASM8


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




@triton.jit
def _decode_plane_asm(b, W: tl.constexpr):
    """:func:`_decode_plane` straight to fp16 with packed PTX (CUDA only); ``W = 1`` returns bit * 4."""
    if W == 1:  # only as the upper plane of a 3-bit code (2-bit plane below): values are bit * 4
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            ASM1X4, ASM1_CONSTRAINTS, [b], dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                                                    tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
        c = _channels8(c0, c1, c2, c3, c4, c5, c6, c7)
    elif W == 8:
        c = tl.inline_asm_elementwise(ASM8, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)
    elif W == 4:
        lo, hi = tl.inline_asm_elementwise(ASM4, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)
        c = tl.interleave(lo, hi)
    else:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(ASM2, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
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
    """3-bit codes in pair order (:data:`ASM3P`) from the 2-bit plane's 16-bit units ``lo`` ``[R, C]``
    and the 1-bit plane's bytes ``hi`` ``[R, C]`` as fp16 ``[R, 8 C]`` in element order."""
    o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
        ASM3P, "=r,=r,=r,=r,=r,=r,=r,=r,r,h", [lo, hi], dtype=(tl.float16,) * 8, is_pure=True, pack=2)
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
def unpack_tokens(base, d, dmask, t0, end, stride_t, D: tl.constexpr, BLOCK_N: tl.constexpr, W0: tl.constexpr,
                   W1: tl.constexpr, VT: tl.constexpr, ASM: tl.constexpr):
    """Codes of a token-blocked tile as fp16 ``[len(d), BLOCK_N]`` (channels x tokens, token
    order; ``BLOCK_N == VT``): the transpose of :func:`unpack`'s tile, unpacked along tokens."""
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
    the row (:data:`ROW_UNITS3`; 0: Triton's choice, a whole row per thread)."""
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
    (:data:`ASM3`): each word is 8 channels' 16 low-plane bits and their 8 high bits (:func:`_words3`).
    Needs ``D % 16 == 0``, so that every row and plane offset is even."""
    w = _words3(base, t, tmask, stride_t, D, BLOCK_D, UNITS, True)
    c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
        ASM3, ASM3_CONSTRAINTS, [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
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
            ASM3C, ASM3_CONSTRAINTS, [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                                                   tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
        return _channels8(c0, c1, c2, c3, c4, c5, c6, c7)
    c = _channels8(w & 7, (w >> 3) & 7, (w >> 6) & 7, (w >> 9) & 7, (w >> 12) & 7, (w >> 15) & 7, (w >> 18) & 7,
                   (w >> 21) & 7).to(tl.uint16)
    return (c | tl.full([1, 1], 0x6400, tl.uint16)).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _unpack3n_asm(base, t, tmask, stride_t, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """3-bit codes ``[len(t), BLOCK_D]`` as fp16, both planes per PTX call (:data:`ASM3N`): each
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
    c0, c1, c2, c3 = tl.inline_asm_elementwise(ASM3N, "=r,=r,=r,=r,r", [e],
                                               dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                               is_pure=True, pack=2)
    return _channels4(c0, c1, c2, c3)


@triton.jit
def unpack(base, t, tmask, stride_t, D: tl.constexpr, BLOCK_D: tl.constexpr, W0: tl.constexpr,
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
def dequant_groups(code, s_base, z_base, t, tmask, stride_t, D: tl.constexpr, G: tl.constexpr,
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
    return fma16(code, s_full, z_full, F16)


@triton.jit
def fma16(code, s, z, F16: tl.constexpr):
    """``code * s + z`` as fp16: in fp16 registers (``F16``: one packed FMA per 2 elements, as the
    one-group tiles) or in fp32 (a convert per operand and element)."""
    if F16:
        return code.to(tl.float16) * s.to(tl.float16) + z.to(tl.float16)
    return (code.to(tl.float32) * s.to(tl.float32) + z.to(tl.float32)).to(tl.float16)


@triton.jit
def hadamard_rows(x, LOG_D: tl.constexpr):
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
def dequant_groups_t(code_t, s_base, z_base, t, tmask, stride_t, D: tl.constexpr, G: tl.constexpr,
                      NG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F16: tl.constexpr = False):
    """:func:`dequant_groups` for a ``[BLOCK_D, BLOCK_N]`` (channels x tokens) tile."""
    j = tl.arange(0, NG)
    smask = (j * G < D)[:, None] & tmask[None, :]
    off = t.to(tl.int64)[None, :] * stride_t + j[:, None]
    s_t = tl.load(s_base + off, mask=smask, other=0.0)
    z_t = tl.load(z_base + off, mask=smask, other=0.0)
    s_full = tl.reshape(tl.broadcast_to(s_t[:, None, :], (NG, G, BLOCK_N)), (BLOCK_D, BLOCK_N))
    z_full = tl.reshape(tl.broadcast_to(z_t[:, None, :], (NG, G, BLOCK_N)), (BLOCK_D, BLOCK_N))
    return fma16(code_t, s_full, z_full, F16)


