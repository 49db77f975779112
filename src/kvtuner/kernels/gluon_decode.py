"""Prototype: decode attention over a packed KIVI cache (G = 32, head_dim 128, 2-, 4- and 8-bit keys and
values) and its residual window, in Gluon.

Each warp owns one 32-token key group per 128-token tile and keeps its own online softmax, so no
reduction crosses warps in the token loop; codes are loaded with 16- and 8-byte vectors in layouts
chosen so that, after unpacking in registers, they are the mma.sync operands (a permutation of the
channels, applied to q and undone at the output store, makes every thread's bytes contiguous).
"""
import triton.experimental.gluon.language as gl
from triton.experimental import gluon
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .ptx import ASM2, ASM4, ASM8


@gluon.constexpr_function
def dim_layout(layout, rank, d):
    for k in reversed(range(rank)):
        if k != d:
            layout = gl.SliceLayout(k, layout)
    return layout


@gluon.jit
def _index(n: gl.constexpr, layout: gl.constexpr, rank: gl.constexpr, d: gl.constexpr):
    """arange(n) along dim d of a rank-`rank` tensor of `layout` (size 1 elsewhere)."""
    x = gl.arange(0, n, layout=dim_layout(layout, rank, d))
    for k in gl.static_range(rank):
        if k != d:
            x = gl.expand_dims(x, k)
    return x


@gluon.jit
def _unpack(b, BITS: gl.constexpr):
    """fp16 codes of bytes ``b``: one tensor per code of a byte (low bits first), each of ``b``'s shape."""
    if BITS == 8:
        return (gl.inline_asm_elementwise(ASM8, "=r,=r,r", [b], dtype=gl.float16, is_pure=True, pack=4),)
    elif BITS == 4:
        return gl.inline_asm_elementwise(ASM4, "=r,=r,=r,=r,r", [b], dtype=(gl.float16, gl.float16), is_pure=True,
                                         pack=4)
    else:
        return gl.inline_asm_elementwise(ASM2, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                         dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=4)


@gluon.jit
def _dequant_last(c, s, z, BITS: gl.constexpr):
    """The per-code tensors of :func:`_unpack` times their scales ``s`` plus zeros ``z`` (tuples of the same
    length, or longer), joined on new last dims: none at 8 bits, [.., 2] (the code index) at 4 bits,
    [.., 2 (f & 1), 2 (f >> 1)] at 2 bits."""
    if BITS == 8:
        return c[0] * s[0] + z[0]
    elif BITS == 4:
        return gl.join(c[0] * s[0] + z[0], c[1] * s[1] + z[1])
    else:
        return gl.join(gl.join(c[0] * s[0] + z[0], c[1] * s[1] + z[1]),
                       gl.join(c[2] * s[2] + z[2], c[3] * s[3] + z[3]))


@gluon.jit
def _per_code(s5, BITS: gl.constexpr, layout: gl.constexpr):
    """Per-channel rows ``[W, 1, 1, 4, 32]`` (channels 32j + c) as the scales of each code tensor of
    :func:`_unpack` on keys in channel word order, ``[W, 1, 1, 4, R]``: code f of byte r = 4m + k holds
    channel 32j + 4F m + 4f + k (F codes per byte)."""
    W: gl.constexpr = s5.shape[0]
    if BITS == 8:
        return (gl.convert_layout(s5, layout),)
    elif BITS == 4:
        s7 = gl.permute(gl.reshape(s5, [W, 1, 1, 4, 4, 2, 4]), [0, 1, 2, 3, 4, 6, 5])  # .. m k f
        c0, c1 = gl.split(gl.reshape(s7, [W, 1, 1, 4, 16, 2]))
        return gl.convert_layout(c0, layout), gl.convert_layout(c1, layout)
    else:
        s8 = gl.permute(gl.reshape(s5, [W, 1, 1, 4, 2, 2, 2, 4]), [0, 1, 2, 3, 4, 7, 6, 5])  # .. m k f0 f1
        lo, hi = gl.split(gl.reshape(s8, [W, 1, 1, 4, 8, 2, 2]))
        c0, c1 = gl.split(lo)
        c2, c3 = gl.split(hi)
        return (gl.convert_layout(c0, layout), gl.convert_layout(c1, layout), gl.convert_layout(c2, layout),
                gl.convert_layout(c3, layout))


@gluon.jit
def _softmax(q_a, k_b, valid, m_i, l_i, acc, MMA: gl.constexpr, A_OP: gl.constexpr):
    """One online-softmax step of every warp over its 32 tokens: scores, running max and sum, the
    rescaled accumulator and the probabilities as the ``P V`` operand."""
    W: gl.constexpr = q_a.shape[0]
    BH: gl.constexpr = q_a.shape[1]
    s = mma_v2(q_a, k_b, gl.zeros([W, BH, 32], gl.float32, layout=MMA))
    s = gl.where(valid, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=2))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s - gl.expand_dims(m_safe, 2))
    l_i = l_i * alpha + gl.sum(p, axis=2)
    return m_new, l_i, acc * gl.expand_dims(alpha, 2), gl.convert_layout(p.to(gl.float16), A_OP)


@gluon.jit
def split_kernel(Q, QR, KC, KS, KZ, VC, VS, VZ, KR, VR, MASK, LENS, PO, PM, PL,
                 sq_b, sq_h, sqr_b, sqr_h, skc_b, skc_h, skc_t, sks_b, sks_h, sks_t,
                 svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, skr_b, skr_h, skr_t, svr_b, svr_h, svr_t, smask_b,
                 n_q, n_r, tokens_per_split, num_q_splits, qk_scale, qk_scale_r, HKV, GROUP, NUM_SPLITS,
                 KBITS: gl.constexpr = 4, VBITS: gl.constexpr = 4, VPAIRS: gl.constexpr = True,
                 STAGES: gl.constexpr = 0, HAS_MASK: gl.constexpr = False, DEV_LEN: gl.constexpr = False):
    """Grid ``(B * Hkv, num_q_splits + 1)``: programs below ``num_q_splits`` attend over their range of the
    packed history, the last one over the residual window; every warp writes its partial result to split
    slot ``program split * 4 + warp``. ``DEV_LEN`` (CUDA-graph replay): ``n_q`` / ``n_r`` are capacities,
    the counts are read from ``LENS`` (quantized tokens / 32, residual tokens). ``HAS_MASK``: ``MASK``
    ``[B, >= n_q + n_r]``, nonzero where a stored token (packed ones first, then the residual) may be
    attended."""
    D: gl.constexpr = 128
    BH: gl.constexpr = 16
    W: gl.constexpr = 4
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    KRB: gl.constexpr = 4 * KBITS  # key bytes a thread reads per token: 32 channels
    XV: gl.constexpr = 4 * VBITS  # value bytes a thread reads per token pair: 16 channels of 2 tokens
    # key bytes [warp, n_hi 4, n_lo 8, j 4, r KRB]: contiguous bytes of a token row
    KB: gl.constexpr = gl.BlockedLayout([1, 4, 1, 1, KRB], [1, 1, 8, 4, 1], [W, 1, 1, 1, 1], [4, 3, 2, 1, 0])
    KS5: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 32], [1, 1, 8, 4, 1], [W, 1, 1, 1, 1], [4, 3, 2, 1, 0])
    # value bytes [warp, n_hi 4, n_lo>>1 4, u 8, x XV] (contiguous bytes of a token pair), unpacked
    # as [.., xb XV/2, xp 2]
    VB5: gl.constexpr = gl.BlockedLayout([1, 4, 1, 1, XV], [1, 1, 4, 8, 1], [W, 1, 1, 1, 1], [4, 2, 3, 1, 0])
    VB: gl.constexpr = gl.BlockedLayout([1, 4, 1, 1, XV // 2, 2], [1, 1, 4, 8, 1, 1], [W, 1, 1, 1, 1, 1],
                                        [5, 4, 2, 3, 1, 0])
    VS6: gl.constexpr = gl.BlockedLayout([1, 4, 1, 1, 1, 2], [1, 1, 4, 8, 1, 1], [W, 1, 1, 1, 1, 1],
                                         [5, 4, 2, 3, 1, 0])
    # values packed along head_dim per token (VPAIRS off): [warp, n_hi, n_lo>>1, u, xp 2, xb XV/2], the
    # contiguous bytes of each token row of a pair, reordered in registers for the unpacker
    VBP: gl.constexpr = gl.BlockedLayout([1, 4, 1, 1, 2, XV // 2], [1, 1, 4, 8, 1, 1], [W, 1, 1, 1, 1, 1],
                                         [5, 4, 2, 3, 1, 0])
    gl.static_assert(VPAIRS or STAGES == 0, "the cp.async ring reads values in token pairs")
    QL: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 2, 16], [W, 1, 1], [2, 1, 0])
    RL: gl.constexpr = gl.BlockedLayout([1, 1, 1, 8], [1, 8, 4, 1], [W, 1, 1, 1], [3, 2, 1, 0])

    if DEV_LEN:
        n_q = gl.load(LENS).to(gl.int32) * 32
        n_r = gl.load(LENS + 1).to(gl.int32)
    pid_bh = gl.program_id(0)
    split = gl.program_id(1)
    b = (pid_bh // HKV).to(gl.int64)
    h = (pid_bh % HKV).to(gl.int64)
    mrow = MASK + b * smask_b
    # q in the kernel's channel order kappa = kb0 + 2j + 8kb1 + 16 (f + F m) <-> channel 32j + 4F m + 4f + 2kb1
    # + kb0 (keys in channel word order: code f of byte k of word m holds channel 4F m + 4f + k, F = 8 / bits)
    F: gl.constexpr = 8 // KBITS
    kap = _index(D, QL, 3, 2)
    hrow = _index(BH, QL, 3, 1)
    rest = kap >> 4
    ch = 32 * ((kap >> 1) & 3) + 4 * F * (rest // F) + 4 * (rest % F) + 2 * ((kap >> 3) & 1) + (kap & 1)
    qmask = (hrow < GROUP) & (_index(W, QL, 3, 0) >= 0)
    qrow = (h * GROUP + hrow).to(gl.int64)
    mw = _index(W, MMA, 3, 0)
    mn = _index(32, MMA, 3, 2)
    m_i = gl.full([W, BH], float("-inf"), gl.float32, layout=gl.SliceLayout(2, MMA))
    l_i = gl.zeros([W, BH], gl.float32, layout=gl.SliceLayout(2, MMA))
    acc = gl.zeros([W, BH, D], gl.float32, layout=MMA)

    if split < num_q_splits:
        q = gl.load(Q + b * sq_b + qrow * sq_h + ch, mask=qmask, other=0.0).to(gl.float32)
        q_a = gl.convert_layout((q * qk_scale).to(gl.float16), A_OP)
        start = split * tokens_per_split
        end = gl.minimum(start + tokens_per_split, n_q)
        kc = KC + b * skc_b + h * skc_h
        ks = KS + b * sks_b + h * sks_h
        kz = KZ + b * sks_b + h * sks_h
        vc = VC + b * svc_b + h * svc_h
        vs = VS + b * svs_b + h * svs_h
        vz = VZ + b * svs_b + h * svs_h
        ktok = _index(W, KB, 5, 0) * 32 + _index(4, KB, 5, 1) * 8 + _index(8, KB, 5, 2)
        kbyte = _index(4, KB, 5, 3) * KRB + _index(KRB, KB, 5, 4)
        sw = _index(W, KS5, 5, 0)
        sch = _index(4, KS5, 5, 3) * 32 + _index(32, KS5, 5, 4)
        if VPAIRS:
            vpair = _index(W, VB5, 5, 0) * 32 + _index(4, VB5, 5, 1) * 8 + _index(4, VB5, 5, 2) * 2  # pair's first
            vbyte = _index(8, VB5, 5, 3) * XV + _index(XV, VB5, 5, 4)  # bytes of a token pair, interleaved
        else:
            vpair = _index(W, VBP, 6, 0) * 32 + _index(4, VBP, 6, 1) * 8 + _index(4, VBP, 6, 2) * 2
            vxp = _index(2, VBP, 6, 4)
            vbyte = _index(8, VBP, 6, 3) * (XV // 2) + _index(XV // 2, VBP, 6, 5)
        sxp = _index(2, VS6, 6, 5)
        spair = _index(W, VS6, 6, 0) * 32 + _index(4, VS6, 6, 1) * 8 + _index(4, VS6, 6, 2) * 2
        sgrp = _index(8, VS6, 6, 3) // 2
        # pointers advance by one 128-token tile per step; masks compare against the tokens left
        kptr = kc + (start + ktok).to(gl.int64) * skc_t + kbyte
        sptr = ((start + sw * 32) // 32).to(gl.int64) * sks_t + sch
        if VPAIRS:  # codes and scales of a token pair interleaved (value_token_pairs)
            vptr = vc + (start + vpair).to(gl.int64) * svc_t + vbyte
            vsptr = (start + spair).to(gl.int64) * svs_t + (2 * sgrp + sxp)
        else:
            vptr = vc + (start + vpair + vxp).to(gl.int64) * svc_t + vbyte
            vsptr = (start + spair + sxp).to(gl.int64) * svs_t + sgrp
        if STAGES > 0:  # a ring of STAGES tiles of codes in shared memory, filled by cp.async; every thread
            # copies the bytes it reads later
            SM5: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [4, 3, 2, 1, 0])
            kbuf = gl.allocate_shared_memory(gl.uint8, [STAGES, W, 4, 8, 4, KRB], SM5)
            vbuf = gl.allocate_shared_memory(gl.uint8, [STAGES, W, 4, 4, 8, XV], SM5)
            for st in gl.static_range(STAGES - 1):
                left_s = end - (start + st * 128)
                cp.async_copy_global_to_shared(kbuf.index(st), kptr + st * 128 * skc_t, mask=ktok < left_s)
                cp.async_copy_global_to_shared(vbuf.index(st), vptr + st * 128 * svc_t, mask=vpair < left_s)
                cp.commit_group()
        for it in range(tokens_per_split // 128):
            left = end - (start + it * 128)
            if STAGES > 0:
                ahead = left - (STAGES - 1) * 128
                slot = (it + STAGES - 1) % STAGES
                cp.async_copy_global_to_shared(kbuf.index(slot), kptr + (STAGES - 1) * 128 * skc_t,
                                               mask=ktok < ahead)
                cp.async_copy_global_to_shared(vbuf.index(slot), vptr + (STAGES - 1) * 128 * svc_t,
                                               mask=vpair < ahead)
                cp.commit_group()
                cp.wait_group(STAGES - 1)
                kbytes = kbuf.index(it % STAGES).load(KB)
                vbytes = vbuf.index(it % STAGES).load(VB5)
            else:  # masked codes stay undefined: their scores are -inf, their values meet probability 0
                kbytes = gl.load(kptr, mask=ktok < left)
                vbytes = gl.load(vptr, mask=vpair < left)
            # ---- keys: codes -> fp16 in registers, scales per channel of the warp's group
            kcodes = _unpack(kbytes, KBITS)
            gmask = (sw * 32 < left) & (sch >= 0)
            ksc = _per_code(gl.load(ks + sptr, mask=gmask, other=0.0).to(gl.float16), KBITS, KB)
            kze = _per_code(gl.load(kz + sptr, mask=gmask, other=0.0).to(gl.float16), KBITS, KB)
            kd = _dequant_last(kcodes, ksc, kze, KBITS)
            if KBITS == 8:  # w nh nl j m kb1 kb0
                kd = gl.permute(gl.reshape(kd, [W, 4, 8, 4, 8, 2, 2]), [0, 4, 5, 3, 6, 1, 2])
            elif KBITS == 4:  # w nh nl j m kb1 kb0 f
                kd = gl.permute(gl.reshape(kd, [W, 4, 8, 4, 4, 2, 2, 2]), [0, 4, 7, 5, 3, 6, 1, 2])
            else:  # w nh nl j m kb1 kb0 f0 f1
                kd = gl.permute(gl.reshape(kd, [W, 4, 8, 4, 2, 2, 2, 2, 2]), [0, 4, 8, 7, 5, 3, 6, 1, 2])
            k_b = gl.convert_layout(gl.reshape(kd, [W, D, 32]), B_OP)
            valid = mw * 32 + mn < left
            if HAS_MASK:
                valid = valid & (gl.load(mrow + start + it * 128 + mw * 32 + mn, mask=valid, other=0) != 0)
            m_i, l_i, acc, p_a = _softmax(q_a, k_b, valid, m_i, l_i, acc, MMA, A_OP)
            # ---- values in token pairs: every fp16x2 the unpacker returns holds one channel of two tokens
            if VPAIRS:
                vbytes = gl.reshape(vbytes, [W, 4, 4, 8, XV // 2, 2])
            else:
                vbytes = gl.permute(vbytes, [0, 1, 2, 3, 5, 4])
            vcodes = _unpack(gl.convert_layout(vbytes, VB), VBITS)
            smask = spair < left
            sv = gl.convert_layout(gl.load(vs + vsptr, mask=smask, other=0.0).to(gl.float16), VB)
            zv = gl.convert_layout(gl.load(vz + vsptr, mask=smask, other=0.0).to(gl.float16), VB)
            # code f of byte xb of the pair's tokens: channel 16u + (8 / VBITS) xb + f; nu = u + 8 (channel - 16u)
            vd = _dequant_last(vcodes, (sv, sv, sv, sv), (zv, zv, zv, zv), VBITS)
            if VBITS == 8:  # w nh nlh u xb xp
                vd = gl.permute(vd, [0, 1, 2, 5, 4, 3])
            elif VBITS == 4:  # w nh nlh u xb xp f
                vd = gl.permute(vd, [0, 1, 2, 5, 4, 6, 3])
            else:  # w nh nlh u xb xp f0 f1
                vd = gl.permute(vd, [0, 1, 2, 5, 4, 7, 6, 3])
            v_b = gl.convert_layout(gl.reshape(vd, [W, 32, D]), B_OP)
            acc = mma_v2(p_a, v_b, acc)
            kptr += 128 * skc_t
            sptr += 4 * sks_t
            vptr += 128 * svc_t
            vsptr += 128 * svs_t
    else:  # the full-precision residual window (plain basis: the query of QR), 32 tokens per warp
        q = gl.load(QR + b * sqr_b + qrow * sqr_h + kap, mask=qmask, other=0.0).to(gl.float32)  # channel order
        q_a = gl.convert_layout((q * qk_scale_r).to(gl.float16), A_OP)
        rtok = _index(W, RL, 4, 0) * 32 + _index(32, RL, 4, 1)
        rch = _index(8, RL, 4, 2) * 16 + _index(16, RL, 4, 3)
        kr = KR + b * skr_b + h * skr_h + rtok.to(gl.int64) * skr_t + rch
        vr = VR + b * svr_b + h * svr_h + rtok.to(gl.int64) * svr_t + rch
        for r0 in range(0, n_r, 128):
            live = rtok < n_r - r0
            k = gl.load(kr + r0 * skr_t, mask=live, other=0.0).to(gl.float16)  # [w n u c'], channel 16u + c'
            k_b = gl.convert_layout(gl.permute(gl.reshape(k, [W, 32, D]), [0, 2, 1]), B_OP)
            valid = mw * 32 + mn < n_r - r0
            if HAS_MASK:
                valid = valid & (gl.load(mrow + n_q + r0 + mw * 32 + mn, mask=valid, other=0) != 0)
            m_i, l_i, acc, p_a = _softmax(q_a, k_b, valid, m_i, l_i, acc, MMA, A_OP)
            # values to nu order: channel 16u + 2xb + e, nu = 16xb + 8e + u
            v = gl.load(vr + r0 * svr_t, mask=live, other=0.0).to(gl.float16)
            v5 = gl.reshape(v, [W, 32, 8, 8, 2])  # w n u xb e
            v_b = gl.convert_layout(gl.reshape(gl.permute(v5, [0, 1, 3, 4, 2]), [W, 32, D]), B_OP)
            acc = mma_v2(p_a, v_b, acc)

    # ---- one partial per warp: split slot split * W + warp; output channel 16 (nu & 7) + (nu >> 3)
    ow = _index(W, MMA, 3, 0)
    oh = _index(BH, MMA, 3, 1)
    onu = _index(D, MMA, 3, 2)
    row = ((b * HKV + h) * GROUP + oh) * NUM_SPLITS + split * W + ow
    gl.store(PO + row * D + 16 * (onu & 7) + (onu >> 3), acc, mask=(oh < GROUP) & (onu >= 0))
    sw2 = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, MMA)))
    sh2 = gl.arange(0, BH, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
    srow = ((b * HKV + h) * GROUP + gl.expand_dims(sh2, 0)) * NUM_SPLITS + split * W + gl.expand_dims(sw2, 1)
    smask = gl.expand_dims(sh2, 0) < GROUP
    gl.store(PM + srow, m_i, mask=smask)
    gl.store(PL + srow, l_i, mask=smask)


# ---------------------------------------------------------------------------------------------------- host side
LOG2E = 1.4426950408889634


def value_token_pairs(t):
    """``[B, H, T, C]`` rows (value codes or scales/zeros) interleaved by token pairs: the element of
    token ``2p + x`` at column ``c`` goes to position ``2c + x`` of the pair's ``2C`` elements (rows
    ``2p`` and ``2p + 1``), so one fp16x2 the unpacker returns holds one channel of two tokens."""
    b, h, n, c = t.shape
    if n % 2:
        raise ValueError(f"{n} tokens are not whole token pairs")
    return t.reshape(b, h, n // 2, 2, c).transpose(-1, -2).reshape(b, h, n, c).contiguous()


def supported(k_packed, v_packed, head_dim: int) -> bool:
    """Whether :func:`decode_attention` reads this layer's packed storage: KIVI with 32-token key groups
    in channel word order and 32-channel value groups along head_dim, 2-, 4- or 8-bit codes, head_dim 128."""
    return (head_dim == 128 and k_packed.granularity == "per_channel" and k_packed.group_size == 32
            and k_packed.channel_words and not k_packed.token_block and k_packed.bits in (2, 4, 8)
            and v_packed.granularity == "per_token" and v_packed.group_size == 32 and not v_packed.channel_words
            and not v_packed.token_block and v_packed.bits in (2, 4, 8))


def decode_attention(q, k_packed, k_residual, v_packed, v_residual, scaling, kv_mask=None, out_scale=1.0, *,
                     lengths=None, rotate_out=False, q_residual=None, scaling_residual=None, splits=None, stages=0):
    """:func:`kvtuner.kernels.decode_attention`'s contract (packed history, then the residual window;
    ``lengths`` for CUDA-graph replay; ``rotate_out`` / ``q_residual`` / ``scaling_residual`` for rotated
    layers) on the storage :func:`supported` accepts. Returns ``[B, 1, Hq, 128]`` in ``q.dtype``."""
    _, hq, one, d = q.shape
    if k_packed is None or v_packed is None or not supported(k_packed, v_packed, d):
        raise ValueError("the Gluon decode kernel reads KIVI G = 32 storage of 2, 4 or 8 bits at head_dim 128, keys "
                         "in channel word order; allowed: such a packed history (else kvtuner.kernels.decode_attention)")
    hkv, n = k_packed.codes.shape[1], k_packed.num_tokens
    if one != 1 or hq % hkv or hq // hkv > 16 or n % 32 or n == 0 or v_packed.num_tokens < n:
        raise ValueError(f"q {tuple(q.shape)} over {n} packed tokens of {hkv} KV heads; allowed: one query token, "
                         "up to 16 query heads per KV head, whole 32-token groups")
    return _launch(q, k_packed.codes, k_packed.scale, k_packed.zero, v_packed.codes, v_packed.scale, v_packed.zero,
                   scaling, k_packed.bits, v_packed.bits, k_residual, v_residual, q_residual, scaling_residual,
                   kv_mask, lengths, out_scale, rotate_out, splits, stages, value_pairs=False)


decode_attention.fuses_rotation = True  # kvtuner.attention.rotated_decode hands it the output's rotation


def decode_packed(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, scaling, kbits, vbits, k_residual=None,
                  v_residual=None, q_residual=None, scaling_residual=None, splits=None, stages=0, value_pairs=True):
    """Attention of ``q`` ``[B, Hq, 1, 128]`` over a packed history of ``kbits``/``vbits`` codes (2, 4 or 8)
    followed by an optional full-precision residual window ``[B, Hkv, R, 128]``: keys per channel in groups
    of 32 tokens, codes in channel word order (``quant.to_channel_words``); values per token in groups of
    32 channels, codes and scales/zeros in token pairs (:func:`value_token_pairs`; ``value_pairs=False``:
    packed along head_dim per token, as the cache stores them, paired in registers). ``q_residual`` /
    ``scaling_residual``: the residual's query and scale (rotated layers). ``stages``: 0 loads codes
    straight into registers, >= 2 streams them through a ring of that many tiles in shared memory
    (cp.async). Returns ``[B, 1, Hq, 128]`` in ``q.dtype``."""
    _, hq, one, d = q.shape
    _, hkv, n, width = k_codes.shape
    if kbits not in (2, 4, 8) or vbits not in (2, 4, 8) or width != 16 * kbits or v_codes.shape[-1] != 16 * vbits:
        raise ValueError(f"bits ({kbits}, {vbits}) with code rows of {width} and {v_codes.shape[-1]} bytes; allowed: "
                         "2, 4 or 8 bits, rows of head_dim * bits / 8 bytes")
    if d != 128 or one != 1 or hq % hkv or hq // hkv > 16 or n % 32 or n == 0:
        raise ValueError(f"decode_packed covers head_dim 128, up to 16 query heads per KV head and whole 32-token "
                         f"groups; got q {tuple(q.shape)}, key codes {tuple(k_codes.shape)}")
    return _launch(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, scaling, kbits, vbits, k_residual,
                   v_residual, q_residual, scaling_residual, None, None, 1.0, False, splits, stages, value_pairs)


def _launch(q, kc, ks, kz, vc, vs, vz, scaling, kbits, vbits, k_residual, v_residual, q_residual, scaling_residual,
            kv_mask, lengths, out_scale, rotate_out, splits, stages, value_pairs):
    """The split launch over ``splits`` (default: about two programs per SM) ranges of the packed history
    plus the residual's program, then the merge of their per-warp partial results."""
    import torch
    import triton

    from .decode_kernel import merge_kernel

    b, hq, _, d = q.shape
    hkv, n = kc.shape[1], kc.shape[2]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    nqs = splits or max(1, min(triton.cdiv(n, 128), triton.cdiv(2 * sms, b * hkv)))
    per = triton.cdiv(triton.cdiv(n, nqs), 128) * 128
    nqs = triton.cdiv(n, per)
    num_splits = 4 * (nqs + 1)
    rows = b * hq * num_splits
    partial = torch.empty(rows * (d + 2), device=q.device, dtype=torch.float32)
    po, pm, pl = partial[: rows * d], partial[rows * d: rows * (d + 1)], partial[rows * (d + 1):]
    qr = q if q_residual is None else q_residual
    kr = k_residual if k_residual is not None else q.new_empty(b, hkv, 0, d)
    vr = v_residual if v_residual is not None else q.new_empty(b, hkv, 0, d)
    mask = kv_mask.to(torch.uint8) if kv_mask is not None else torch.empty(1, device=q.device, dtype=torch.uint8)
    lens = lengths if lengths is not None else torch.empty(1, device=q.device, dtype=torch.int32)
    split_kernel[(b * hkv, nqs + 1)](
        q, qr, kc, ks, kz, vc, vs, vz, kr, vr, mask, lens, po, pm, pl,
        q.stride(0), q.stride(1), qr.stride(0), qr.stride(1), *kc.stride()[:3], *ks.stride()[:3],
        *vc.stride()[:3], *vs.stride()[:3], *kr.stride()[:3], *vr.stride()[:3],
        mask.stride(0) if kv_mask is not None else 0, n, kr.shape[2], per, nqs, float(scaling) * LOG2E,
        float(scaling if scaling_residual is None else scaling_residual) * LOG2E, hkv, hq // hkv, num_splits,
        KBITS=kbits, VBITS=vbits, VPAIRS=value_pairs, STAGES=stages, HAS_MASK=kv_mask is not None,
        DEV_LEN=lengths is not None, num_warps=4)
    out = torch.empty(b, 1, hq, d, device=q.device, dtype=q.dtype)
    merge_kernel[(b * hq,)](po, pm, pl, out, out.stride(0), out.stride(2), hq, num_splits, float(out_scale), D=d,
                            BLOCK_D=d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), ROT_O=bool(rotate_out),
                            LOG_D=d.bit_length() - 1, RES_SPLITS=4)
    return out
