"""The two decode kernels: attention of one query token per sequence over split ranges of the packed
cache (``split_kernel``), and the log-sum-exp merge of the splits (``merge_kernel``).

Grid ``(B * Hkv, splits)``: one program holds all query heads of one KV head as a ``[BLOCK_H >= 16, D]``
tile, so every packed byte is read once. The last split reads the full-precision residual window.
Codes are unpacked in registers (:mod:`.unpack`), dot products run in fp16 (codes below 256 are exact),
the softmax runs in base 2 with ``scaling * log2(e)`` folded into q, and offsets that scale with
batch x heads x tokens are int64. ``docs/kernels.md`` explains each choice.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ptx import ROW_UNITS3
from .unpack import dequant_groups, dequant_groups_t, fma16, hadamard_rows, unpack, unpack_tokens


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
def split_kernel(
        Q, QR, KC, KS, KZ, VC, VS, VZ, KR, VR, MASK, LENS, PO, PM, PL,
        sq_b, sq_h, sqr_b, sqr_h,
        skc_b, skc_h, skc_t, sks_b, sks_h, sks_t,
        svc_b, svc_h, svc_t, svs_b, svs_h, svs_t,
        skr_b, skr_h, skr_t, svr_b, svr_h, svr_t,
        smask_b,
        n_q, n_r, tokens_per_split, num_q_splits, qk_scale, qk_scale_r, HKV, GROUP, NUM_SPLITS,
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
    hq64 = (h * GROUP + hrow).to(tl.int64)
    qmask = hmask[:, None] & dmask[None, :]
    if split < num_q_splits:  # the packed history, stored rotated in rotated layers: its own query
        q = tl.load(Q + b * sq_b + hq64[:, None] * sq_h + d[None, :], mask=qmask, other=0.0).to(tl.float32)
        if ROT_Q:  # keys stored as k H: scores need q H = q S / sqrt(D) (the 1/sqrt(D) is in qk_scale)
            q = hadamard_rows(q, LOG_D)
        q = q * qk_scale
    else:  # the residual window is never rotated
        q = tl.load(QR + b * sqr_b + hq64[:, None] * sqr_h + d[None, :], mask=qmask, other=0.0).to(tl.float32)
        q = q * qk_scale_r

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
        # 3-bit keys load like 3-bit values packed along head_dim beside them (:data:`ROW_UNITS3`; their
        # tiles share the layout); otherwise whole rows, which measured no worse
        KEY_UNITS3: tl.constexpr = ROW_UNITS3 if (VT == 0 and VW0 == 2 and VW1 == 1) else 0
        span = tokens_per_split
        if DEV_LEN:  # splits sized for the capacity: stop at the filled length
            span = tl.maximum(tl.minimum(end - start, tokens_per_split), 0)
        for i in range(0, span, BLOCK_N):  # whole-split bound: tiles past ``end`` are masked
            t0 = start + i
            t = t0 + tl.arange(0, BLOCK_N)
            tmask = t < end
            # ---- scores = q . k^T, k = codes * scale + zero
            # [BLOCK_N, BLOCK_D] fp16
            kcode = unpack(kc, t, tmask, skc_t, D, BLOCK_D, KW0, KW1, ASM, UNPACK3_K, KWORDS, KEY_UNITS3)
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
                    scores = _qk(q.to(tl.float16), fma16(kcode, s_full, z_full, DQ16), SWAP_QK)
            else:
                NGK: tl.constexpr = BLOCK_D // GK
                if NGK == 1:  # one scale per token and head: apply after the dot
                    s_col = tl.load(ks + t.to(tl.int64) * sks_t, mask=tmask, other=0.0).to(tl.float32)
                    z_col = tl.load(kz + t.to(tl.int64) * sks_t, mask=tmask, other=0.0).to(tl.float32)
                    qsum = tl.sum(q, axis=1)
                    scores = _qk(q.to(tl.float16), kcode, SWAP_QK) * _tok(s_col, SWAP_QK) \
                        + _head(qsum, SWAP_QK) * _tok(z_col, SWAP_QK)
                else:
                    k = dequant_groups(kcode, ks, kz, t, tmask, sks_t, D, GK, NGK, BLOCK_N, BLOCK_D, DQ16)
                    scores = _qk(q.to(tl.float16), k, SWAP_QK)
            valid = tmask
            if HAS_MASK:
                mk = tl.load(MASK + b * smask_b + t, mask=tmask, other=0)
                valid = valid & (mk != 0)
            m_i, l_i, acc, p = _softmax_step(scores, valid, m_i, l_i, acc, SWAP_QK, SWAP_PV)
            # ---- acc += p . v, v = codes * scale + zero (per token)
            NGV: tl.constexpr = BLOCK_D // GV
            if VT > 0:  # token-blocked values: a [D, N] tile unpacked along the dot's depth (tokens)
                vcode = unpack_tokens(vc, d, dmask, t0, end, svc_t, D, BLOCK_N, VW0, VW1, VT, ASM)
            else:
                vcode = unpack(vc, t, tmask, svc_t, D, BLOCK_D, VW0, VW1, ASM, UNPACK3_V, VWORDS, ROW_UNITS3)
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
                    v = dequant_groups_t(vcode, vs, vz, t, tmask, svs_t, D, GV, NGV, BLOCK_N, BLOCK_D, DQ16)
                else:
                    v = dequant_groups(vcode, vs, vz, t, tmask, svs_t, D, GV, NGV, BLOCK_N, BLOCK_D, DQ16)
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
def merge_kernel(PO, PM, PL, O, so_b, so_h, HQ, NUM_SPLITS, out_scale, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_S: tl.constexpr, ROT_O: tl.constexpr = False, LOG_D: tl.constexpr = 0,
                  RES_SPLITS: tl.constexpr = 1):
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
    den = tl.sum(l_s * w, axis=0)
    if ROT_O:  # packed values stored as v H: their part of o is (o H) H = (o H) S / sqrt(D), the
        # 1/sqrt(D) being out_scale; the residual splits (the last RES_SPLITS) read plain values
        last = s >= NUM_SPLITS - RES_SPLITS
        packed = tl.sum(acc * tl.where(last, 0.0, w)[:, None], axis=0)
        packed = tl.reshape(hadamard_rows(tl.reshape(packed, (1, BLOCK_D)), LOG_D), (BLOCK_D,))
        num = packed * out_scale + tl.sum(acc * tl.where(last, w, 0.0)[:, None], axis=0)
    else:
        num = tl.sum(acc * w[:, None], axis=0) * out_scale
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(O + b * so_b + h * so_h + d, out.to(O.dtype.element_ty), mask=d < D)
