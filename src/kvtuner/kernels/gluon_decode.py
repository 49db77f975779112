"""Decode attention over a packed KIVI cache (G = 32, head_dim 128, 2-, 4- and 8-bit keys, 2-, 3-, 4- and 8-bit
values) and its residual window, in Gluon (explicit layouts).

Scores and outputs are computed transposed, ``S^T = K q'^T`` and ``O^T = V^T P^T``, so the query heads of a
KV head (GQA) fill the MMA's N dimension (8, or 16 above 8 heads) instead of padding its M to 16: half the
MMAs, accumulator and rescaling of the other orientation. Each warp owns one 32-token key group per
128-token tile with its own online softmax; the four warps' results are merged at the program's end. Codes
are loaded with 8- to 16-byte vectors (straight into registers, or through a ``cp.async`` ring of tiles in
shared memory) in layouts whose registers, once unpacked, are the MMA operands (a permutation of the
channels, applied to q once and undone at the output store, makes every thread's bytes contiguous).

Keys are never dequantized: their unpacked fp16 values ``1024 + f c`` (``f`` the code's power-of-two
position in its byte) meet ``q' = q s FMAX / f`` (scales folded into q, one packed multiply per 2 channels
and head), and one bias MMA per group adds ``FMAX sum q z - 1024 sum q'`` from the same fp16 ``q'``, so the
offset cancels in fp32. Values are dequantized per code (their scales vary along the MMA's K), in token
pairs (``quant.in_token_pairs``: one unpacked fp16x2 register holds a channel of two tokens; 3-bit values
join their 1-bit plane in the same PTX); the probabilities reach the ``P V`` operand with one
``movmatrix`` per 8 x 8 block.
"""
import triton.experimental.gluon.language as gl
from triton.experimental import gluon
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from .ptx import ASM2, ASM3TP, ASM4, ASM8, MOVMATRIX_T, RAW2, RAW4, RAW8


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


_WARPS = gl.constexpr(4)  # per program, one 32-token key group each per 128-token tile


@gluon.constexpr_function
def _layout(name, kbits=4, vbits=4):
    """The kernel's register layouts, all over ``[4 warps, ...]``: ``"mma"`` (the ``mma.sync`` accumulator),
    ``"a"`` / ``"b"`` (its operands); ``"qb"``: ``[w, D (kappa), BH]`` as the B operand holds it (lane % 4 ->
    kappa bits 1-2, lane / 4 -> head); ``"zb"``: ``[w, 32 tok, D (kappa)]`` as the A operand holds it;
    ``"ks"``: key scale rows ``[w, 4 j, 32]`` (lane % 4 -> j, broadcast over lane / 4); ``"kb"``: key codes
    ``[w, n_hi 4, n_lo 8, j 4, 4 kbits]`` (contiguous bytes of a token row); ``"vb5"``: value codes of token
    pairs ``[w, n_hi 4, n_lo>>1 4, u 8, 4 vbits]``; ``"vbp"``: values as stored ``[w, n_hi, n_lo>>1, u, 2,
    2 vbits]``; ``"vb"``: value codes in the unpacker's order ``[.., xb, xp]``; ``"vs"``: value scales
    ``[.., 1, 2]``; ``"res"``: residual rows ``[w, 32 tok, 8, 16]``; ``"ksc"``: key scale rows as the ring
    copies them (4 per thread, no broadcast); ``"vh"``: the 1-bit plane of 3-bit values ``[.., u 8, 4 bytes]``."""
    w, xv = _WARPS.value, 4 * _plane_bits(vbits)
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[w, 1, 1], instr_shape=[1, 16, 8])
    return {
        "mma": lambda: mma,
        "a": lambda: gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
        "b": lambda: gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2),
        "qb": lambda: gl.BlockedLayout([1, 2, 1], [1, 4, 8], [w, 1, 1], [1, 2, 0]),
        "zb": lambda: gl.BlockedLayout([1, 1, 2], [1, 8, 4], [w, 1, 1], [2, 1, 0]),
        "ks": lambda: gl.BlockedLayout([1, 1, 32], [1, 4, 8], [w, 1, 1], [1, 2, 0]),
        "kb": lambda: gl.BlockedLayout([1, 4, 1, 1, 4 * kbits], [1, 1, 8, 4, 1], [w, 1, 1, 1, 1], [4, 3, 2, 1, 0]),
        "vb5": lambda: gl.BlockedLayout([1, 4, 1, 1, xv], [1, 1, 4, 8, 1], [w, 1, 1, 1, 1], [4, 2, 3, 1, 0]),
        "vbp": lambda: gl.BlockedLayout([1, 4, 1, 1, 2, xv // 2], [1, 1, 4, 8, 1, 1], [w, 1, 1, 1, 1, 1],
                                        [5, 4, 2, 3, 1, 0]),
        "vb": lambda: gl.BlockedLayout([1, 4, 1, 1, xv // 2, 2], [1, 1, 4, 8, 1, 1], [w, 1, 1, 1, 1, 1],
                                       [5, 4, 2, 3, 1, 0]),
        "vs": lambda: gl.BlockedLayout([1, 4, 1, 1, 1, 2], [1, 1, 4, 8, 1, 1], [w, 1, 1, 1, 1, 1], [5, 4, 2, 3, 1, 0]),
        "res": lambda: gl.BlockedLayout([1, 1, 1, 8], [1, 8, 4, 1], [w, 1, 1, 1], [3, 2, 1, 0]),
        "ksc": lambda: gl.BlockedLayout([1, 1, 4], [1, 4, 8], [w, 1, 1], [2, 1, 0]),
        "vh": lambda: gl.BlockedLayout([1, 4, 1, 1, 4], [1, 1, 4, 8, 1], [w, 1, 1, 1, 1], [4, 2, 3, 1, 0]),
    }[name]()


@gluon.constexpr_function
def _plane_bits(vbits):
    """Bits of the value codes' first (or only) plane: 3-bit codes are a 2-bit plane and a 1-bit plane."""
    return 2 if vbits == 3 else vbits


@gluon.constexpr_function
def _fmax(kbits):
    """The largest power-of-two position factor ``f`` of a code in its byte (raw keys are ``1024 + f c``)."""
    return {8: 1, 4: 16, 2: 64}[kbits]


@gluon.jit
def _unpack(b, BITS: gl.constexpr, RAW: gl.constexpr = False, high=None):
    """fp16 codes of bytes ``b``: one tensor per code of a byte (low bits first), each of ``b``'s shape;
    ``RAW``: ``1024 + code << shift`` (nothing subtracted). 3 bits: ``b`` the 2-bit plane in token pairs,
    ``high`` the 1-bit plane's bytes each of them meets (``ptx.asm3_token_pairs``)."""
    if BITS == 3:
        return gl.inline_asm_elementwise(ASM3TP, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [b, high],
                                         dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=4)
    elif BITS == 8:
        return (gl.inline_asm_elementwise(RAW8 if RAW else ASM8, "=r,=r,r", [b], dtype=gl.float16, is_pure=True,
                                          pack=4),)
    elif BITS == 4:
        return gl.inline_asm_elementwise(RAW4 if RAW else ASM4, "=r,=r,=r,=r,r", [b],
                                         dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
    else:
        return gl.inline_asm_elementwise(RAW2 if RAW else ASM2, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
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
def _codes_last(c, BITS: gl.constexpr):
    if BITS == 8:
        return c[0]
    elif BITS == 4:
        return gl.join(c[0], c[1])
    else:
        return gl.join(gl.join(c[0], c[1]), gl.join(c[2], c[3]))


@gluon.jit
def _transpose_p(p, B_OP: gl.constexpr):
    """P^T [W, 32 tok, BH] from the accumulator layout to the B operand: one movmatrix per 8x8 block."""
    W: gl.constexpr = p.shape[0]
    BH: gl.constexpr = p.shape[2]
    y = gl.inline_asm_elementwise(MOVMATRIX_T, "=r,r", [p], dtype=gl.float16, is_pure=True, pack=2)
    # y[a0 + 8 a1, b + 8 nt] holds p[8 a1 + b, a0 + 8 nt]
    y = gl.permute(gl.reshape(y, [W, 4, 8, BH // 8, 8]), [0, 1, 4, 3, 2])
    return gl.convert_layout(gl.reshape(y, [W, 32, BH]), B_OP, assert_trivial=True)


@gluon.constexpr_function
def _flat(rank):
    """Shared memory in row-major order, unswizzled (each thread reads back the bytes it copied)."""
    return gl.SwizzledSharedLayout(1, 1, 1, list(reversed(range(rank))))


@gluon.jit
def _issue(kb, vb, hb, ksb, kzb, vsb, vzb, kptr, vptr, hptr, ks, kz, kscp, vs, vz, vsptr, ktok, vpair, hpair, cw,
           spair, left, skc_t, sks_t, svc_t, svs_t, VSCALES: gl.constexpr, PLANE1: gl.constexpr):
    """cp.async of one 128-token tile (``left`` tokens remain; none or fewer copy zeros) into one ring slot;
    value scales/zeros only if VSCALES (packed along head_dim, a thread's two tokens are not contiguous:
    2-byte copies, which cp.async lacks); the 1-bit plane of 3-bit values into ``hb`` if PLANE1. Returns the
    pointer offsets advanced to the next tile."""
    async_copy.async_copy_global_to_shared(kb, kptr, mask=ktok < left)
    async_copy.async_copy_global_to_shared(vb, vptr, mask=vpair < left)
    if PLANE1:  # the 1-bit plane of 3-bit values
        async_copy.async_copy_global_to_shared(hb, hptr, mask=hpair < left)
    gmask = cw * 32 < left
    async_copy.async_copy_global_to_shared(ksb, ks + kscp, mask=gmask)
    async_copy.async_copy_global_to_shared(kzb, kz + kscp, mask=gmask)
    if VSCALES:
        smask = spair < left
        async_copy.async_copy_global_to_shared(vsb, vs + vsptr, mask=smask)
        async_copy.async_copy_global_to_shared(vzb, vz + vsptr, mask=smask)
    async_copy.commit_group()
    return kptr + 128 * skc_t, kscp + 4 * sks_t, vptr + 128 * svc_t, hptr + 128 * svc_t, vsptr + 128 * svs_t


@gluon.jit
def _softmax_t(s, m_i, l_i, acc):
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s - gl.expand_dims(m_safe, 1))
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return m_new, l_i, acc * gl.expand_dims(alpha, 1), p.to(gl.float16)


@gluon.jit
def _tile(kbytes, vbytes, hbytes, s3, z3, sv, zv, mptr, left, mw, mt, q_b, qg, neg_m, m_i, l_i, acc,
          KBITS: gl.constexpr, VBITS: gl.constexpr, VPAIRS: gl.constexpr, HAS_MASK: gl.constexpr,
          MASKED: gl.constexpr, VS_PTRS: gl.constexpr = False, smask=None):
    """One 128-token tile from its loaded codes, key scales/zeros ``[W, 4, 32]`` and value scales/zeros (each
    warp's 32-token key group; ``left`` tokens remain; MASKED: maybe fewer than 128). ``hbytes``: the 1-bit
    plane of 3-bit values (else unused). VS_PTRS: ``sv`` / ``zv`` are pointers, loaded (under ``smask``)
    where the values need them, so that their registers live briefly."""
    D: gl.constexpr = 128
    W: gl.constexpr = _WARPS
    BH: gl.constexpr = q_b.shape[2]
    FMAX: gl.constexpr = _fmax(KBITS)
    VP: gl.constexpr = _plane_bits(VBITS)
    XV: gl.constexpr = 4 * VP
    MMA: gl.constexpr = _layout("mma")
    A_OP: gl.constexpr = _layout("a")
    B_OP: gl.constexpr = _layout("b")
    QBL: gl.constexpr = _layout("qb")
    ZBL: gl.constexpr = _layout("zb")
    VB: gl.constexpr = _layout("vb", KBITS, VBITS)
    s3 = s3.to(gl.float16)
    z3 = z3.to(gl.float16)
    # ---- keys: codes as the A operand; scales folded into q, zeros (and the codes' offset) into a bias MMA
    s_k = gl.reshape(gl.permute(gl.reshape(s3, [W, 4, 8, 2, 2]), [0, 2, 3, 1, 4]), [W, D])
    z_k = gl.reshape(gl.permute(gl.reshape(z3, [W, 4, 8, 2, 2]), [0, 2, 3, 1, 4]), [W, D])
    s_k = gl.convert_layout(s_k, gl.SliceLayout(2, QBL), assert_trivial=True)
    z_k = gl.convert_layout(z_k, gl.SliceLayout(1, ZBL), assert_trivial=True)
    qs_b = gl.convert_layout(qg * gl.expand_dims(s_k, 2), B_OP, assert_trivial=True)
    z_a = gl.convert_layout(gl.broadcast(gl.expand_dims(z_k, 1), gl.zeros([W, 32, D], gl.float16, ZBL))[0],
                            A_OP, assert_trivial=True)
    bias = mma_v2(neg_m, qs_b, mma_v2(z_a, q_b, gl.zeros([W, 32, BH], gl.float32, layout=MMA)))
    kd = _codes_last(_unpack(kbytes, KBITS, True), KBITS)
    if KBITS == 8:
        kd = gl.permute(gl.reshape(kd, [W, 4, 8, 4, 8, 2, 2]), [0, 4, 5, 3, 6, 1, 2])
    elif KBITS == 4:
        kd = gl.permute(gl.reshape(kd, [W, 4, 8, 4, 4, 2, 2, 2]), [0, 4, 7, 5, 3, 6, 1, 2])
    else:
        kd = gl.permute(gl.reshape(kd, [W, 4, 8, 4, 2, 2, 2, 2, 2]), [0, 4, 8, 7, 5, 3, 6, 1, 2])
    k_a = gl.convert_layout(gl.permute(gl.reshape(kd, [W, D, 32]), [0, 2, 1]), A_OP)
    s = mma_v2(k_a, qs_b, bias) * (1.0 / FMAX)
    if MASKED:
        valid = mw * 32 + mt < left
        if HAS_MASK:
            valid = valid & (gl.load(mptr + mw * 32 + mt, mask=valid, other=0) != 0)
        s = gl.where(valid, s, float("-inf"))
    elif HAS_MASK:
        s = gl.where(gl.load(mptr + mw * 32 + mt) != 0, s, float("-inf"))
    m_i, l_i, acc, p16 = _softmax_t(s, m_i, l_i, acc)
    p_b = _transpose_p(p16, B_OP)
    # ---- values as the A operand V^T [nu, tok]
    if VPAIRS:
        vbytes = gl.reshape(vbytes, [W, 4, 4, 8, XV // 2, 2])
    else:
        vbytes = gl.permute(vbytes, [0, 1, 2, 3, 5, 4])
    if VBITS == 3:  # each 2-bit plane register [b0 t0, b0 t1, b1 t0, b1 t1] meets its 1-bit plane bytes [B t0, B t1]
        h = gl.reshape(hbytes, [W, 4, 4, 8, 2, 2])  # [.., B, token]; B = 2-bit byte // 2
        h = gl.reshape(gl.permute(gl.join(h, h), [0, 1, 2, 3, 4, 6, 5]), [W, 4, 4, 8, 4, 2])
        vcodes = _unpack(gl.convert_layout(vbytes, VB), 3, high=gl.convert_layout(h, VB))
    else:
        vcodes = _unpack(gl.convert_layout(vbytes, VB), VBITS)
    if VS_PTRS:
        if MASKED:
            sv = gl.load(sv, mask=smask, other=0.0)
            zv = gl.load(zv, mask=smask, other=0.0)
        else:
            sv = gl.load(sv)
            zv = gl.load(zv)
    sv = gl.convert_layout(sv.to(gl.float16), VB)
    zv = gl.convert_layout(zv.to(gl.float16), VB)
    vd = _dequant_last(vcodes, (sv, sv, sv, sv), (zv, zv, zv, zv), VP)
    if VBITS == 8:
        vd = gl.permute(vd, [0, 1, 2, 5, 4, 3])
    elif VBITS == 4:
        vd = gl.permute(vd, [0, 1, 2, 5, 4, 6, 3])
    else:
        vd = gl.permute(vd, [0, 1, 2, 5, 4, 7, 6, 3])
    v_a = gl.convert_layout(gl.permute(gl.reshape(vd, [W, 32, D]), [0, 2, 1]), A_OP)
    return m_i, l_i, mma_v2(v_a, p_b, acc)


@gluon.jit
def _staged_tile(kbuf, vbuf, hbuf, ksbuf, kzbuf, vsbuf, vzbuf, c, vscur, vzcur, mptr, left, spair, mw, mt, q_b, qg,
                 neg_m, m_i, l_i, acc, KBITS: gl.constexpr, VBITS: gl.constexpr, VPAIRS: gl.constexpr,
                 HAS_MASK: gl.constexpr, MASKED: gl.constexpr):
    """:func:`_tile` on ring slot ``c``, read back in the plain loads' register layouts (value scales/zeros
    packed along head_dim are not staged: ``vscur`` / ``vzcur`` point at them)."""
    if VPAIRS:
        VBL: gl.constexpr = _layout("vb5", KBITS, VBITS)
        sv = vsbuf.index(c).load(_layout("vs", KBITS, VBITS))
        zv = vzbuf.index(c).load(_layout("vs", KBITS, VBITS))
    else:
        VBL: gl.constexpr = _layout("vbp", KBITS, VBITS)
        sv = vscur
        zv = vzcur
    if VBITS == 3:
        hb = hbuf.index(c).load(_layout("vh", KBITS, VBITS))
    else:
        hb = None
    return _tile(kbuf.index(c).load(_layout("kb", KBITS, VBITS)), vbuf.index(c).load(VBL), hb,
                 ksbuf.index(c).load(_layout("ks")), kzbuf.index(c).load(_layout("ks")), sv, zv, mptr, left, mw, mt,
                 q_b, qg, neg_m, m_i, l_i, acc, KBITS, VBITS, VPAIRS, HAS_MASK, MASKED, not VPAIRS, spair < left)


@gluon.jit
def split_kernel(Q, QR, KC, KS, KZ, VC, VS, VZ, KR, VR, MASK, LENS, PO, PM, PL,
                 sq_b, sq_h, sqr_b, sqr_h, skc_b, skc_h, skc_t: gl.constexpr, sks_b, sks_h, sks_t: gl.constexpr,
                 svc_b, svc_h, svc_t: gl.constexpr, svs_b, svs_h, svs_t: gl.constexpr, skr_b, skr_h, skr_t, svr_b, svr_h, svr_t, smask_b,
                 n_q, n_r, tokens_per_split, num_q_splits, qk_scale, qk_scale_r, HKV, GROUP, NUM_SPLITS,
                 KBITS: gl.constexpr = 4, VBITS: gl.constexpr = 4, VPAIRS: gl.constexpr = True,
                 HAS_MASK: gl.constexpr = False, DEV_LEN: gl.constexpr = False, BH: gl.constexpr = 8,
                 STAGES: gl.constexpr = 0):
    D: gl.constexpr = 128
    W: gl.constexpr = _WARPS
    KRB: gl.constexpr = 4 * KBITS
    XV: gl.constexpr = 4 * _plane_bits(VBITS)  # bytes of a thread's 16 channels of a token pair (first plane)
    MMA: gl.constexpr = _layout("mma")
    A_OP: gl.constexpr = _layout("a")
    B_OP: gl.constexpr = _layout("b")
    QBL: gl.constexpr = _layout("qb")
    SL: gl.constexpr = _layout("ks")
    KB: gl.constexpr = _layout("kb", KBITS, VBITS)
    VB5: gl.constexpr = _layout("vb5", KBITS, VBITS)
    VBP: gl.constexpr = _layout("vbp", KBITS, VBITS)
    VS6: gl.constexpr = _layout("vs", KBITS, VBITS)
    VH: gl.constexpr = _layout("vh", KBITS, VBITS)
    RL: gl.constexpr = _layout("res")

    if STAGES > 0:
        kbuf = gl.allocate_shared_memory(gl.uint8, [STAGES, W, 4, 8, 4, KRB], _flat(5))
        if VPAIRS:
            vbuf = gl.allocate_shared_memory(gl.uint8, [STAGES, W, 4, 4, 8, XV], _flat(5))
        else:
            vbuf = gl.allocate_shared_memory(gl.uint8, [STAGES, W, 4, 4, 8, 2, XV // 2], _flat(6))
        if VBITS == 3:
            hbuf = gl.allocate_shared_memory(gl.uint8, [STAGES, W, 4, 4, 8, 4], _flat(5))
        else:
            hbuf = kbuf  # a stand-in the kernel neither copies into nor reads
        ksbuf = gl.allocate_shared_memory(KS.dtype.element_ty, [STAGES, W, 4, 32], _flat(3))
        kzbuf = gl.allocate_shared_memory(KS.dtype.element_ty, [STAGES, W, 4, 32], _flat(3))
        vsbuf = gl.allocate_shared_memory(VS.dtype.element_ty, [STAGES, W, 4, 4, 8, 1, 2], _flat(6))
        vzbuf = gl.allocate_shared_memory(VS.dtype.element_ty, [STAGES, W, 4, 4, 8, 1, 2], _flat(6))
    if DEV_LEN:
        n_q = gl.load(LENS).to(gl.int32) * 32
        n_r = gl.load(LENS + 1).to(gl.int32)
    pid_bh = gl.program_id(0)
    split = gl.program_id(1)
    b = (pid_bh // HKV).to(gl.int64)
    h = (pid_bh % HKV).to(gl.int64)
    mrow = MASK + b * smask_b
    F: gl.constexpr = 8 // KBITS
    kap = _index(D, QBL, 3, 1)
    hcol = _index(BH, QBL, 3, 2)
    rest = kap >> 4
    ch = 32 * ((kap >> 1) & 3) + 4 * F * (rest // F) + 4 * (rest % F) + 2 * ((kap >> 3) & 1) + (kap & 1)
    qmask = (hcol < GROUP) & (_index(W, QBL, 3, 0) >= 0) & (kap >= 0)
    qrow = (h * GROUP + hcol).to(gl.int64)
    mw = _index(W, MMA, 3, 0)
    mt = _index(32, MMA, 3, 1)
    m_i = gl.full([W, BH], float("-inf"), gl.float32, layout=gl.SliceLayout(1, MMA))
    l_i = gl.zeros([W, BH], gl.float32, layout=gl.SliceLayout(1, MMA))
    acc = gl.zeros([W, D, BH], gl.float32, layout=MMA)

    if split < num_q_splits:
        q = gl.load(Q + b * sq_b + qrow * sq_h + ch, mask=qmask, other=0.0).to(gl.float32)
        # keys stay 1024 + f c: q' carries FMAX / f, the bias -1024 sum q' and FMAX sum q z
        FMAX: gl.constexpr = _fmax(KBITS)
        fpos = (kap >> 4) % F
        fk = gl.where(fpos == 0, 1.0, gl.where(fpos == 1, 4.0 if KBITS == 2 else 16.0,
                                               gl.where(fpos == 2, 16.0, 64.0)))
        qg = (q * qk_scale * (FMAX / fk)).to(gl.float16)
        q_b = gl.convert_layout((q * (qk_scale * FMAX)).to(gl.float16), B_OP, assert_trivial=True)
        neg_m = gl.full([W, 32, D], -1024.0, gl.float16, layout=A_OP)
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
        sw = _index(W, SL, 3, 0)
        sch = _index(4, SL, 3, 1) * 32 + _index(32, SL, 3, 2)
        if VPAIRS:
            vpair = _index(W, VB5, 5, 0) * 32 + _index(4, VB5, 5, 1) * 8 + _index(4, VB5, 5, 2) * 2
            vbyte = _index(8, VB5, 5, 3) * XV + _index(XV, VB5, 5, 4)
        else:
            vpair = _index(W, VBP, 6, 0) * 32 + _index(4, VBP, 6, 1) * 8 + _index(4, VBP, 6, 2) * 2
            vxp = _index(2, VBP, 6, 4)
            vbyte = _index(8, VBP, 6, 3) * (XV // 2) + _index(XV // 2, VBP, 6, 5)
        sxp = _index(2, VS6, 6, 5)
        spair = _index(W, VS6, 6, 0) * 32 + _index(4, VS6, 6, 1) * 8 + _index(4, VS6, 6, 2) * 2
        sgrp = _index(8, VS6, 6, 3) // 2
        kptr = kc + (start + ktok).to(gl.int64) * skc_t + kbyte
        sptr = ((start + sw * 32) // 32).to(gl.int64) * sks_t + sch
        # 3-bit values: the 1-bit plane of a token pair follows the 64 bytes of its 2-bit plane
        hpair = _index(W, VH, 5, 0) * 32 + _index(4, VH, 5, 1) * 8 + _index(4, VH, 5, 2) * 2
        hptr = vc + (start + hpair).to(gl.int64) * svc_t + (64 + _index(8, VH, 5, 3) * 4 + _index(4, VH, 5, 4))
        if VPAIRS:
            vptr = vc + (start + vpair).to(gl.int64) * svc_t + vbyte
            vsptr = (start + spair).to(gl.int64) * svs_t + (2 * sgrp + sxp)
        else:
            vptr = vc + (start + vpair + vxp).to(gl.int64) * svc_t + vbyte
            vsptr = (start + spair + sxp).to(gl.int64) * svs_t + sgrp
        size = gl.maximum(end - start, 0)
        full = size // 128
        if STAGES == 0:  # plain loads
            for it in range(full):
                if VBITS == 3:
                    hb = gl.load(hptr)
                else:
                    hb = None
                m_i, l_i, acc = _tile(gl.load(kptr), gl.load(vptr), hb, gl.load(ks + sptr), gl.load(kz + sptr),
                                      gl.load(vs + vsptr), gl.load(vz + vsptr), mrow + start + it * 128, 128, mw, mt,
                                      q_b, qg, neg_m, m_i, l_i, acc, KBITS, VBITS, VPAIRS, HAS_MASK, False)
                kptr += 128 * skc_t
                sptr += 4 * sks_t
                vptr += 128 * svc_t
                hptr += 128 * svc_t
                vsptr += 128 * svs_t
            if full * 128 < size:
                left = size - full * 128
                gmask = (sw * 32 < left) & (sch >= 0)
                smask = spair < left
                if VBITS == 3:
                    hb = gl.load(hptr, mask=hpair < left)
                else:
                    hb = None
                m_i, l_i, acc = _tile(gl.load(kptr, mask=ktok < left), gl.load(vptr, mask=vpair < left), hb,
                                      gl.load(ks + sptr, mask=gmask, other=0.0), gl.load(kz + sptr, mask=gmask, other=0.0),
                                      gl.load(vs + vsptr, mask=smask, other=0.0),
                                      gl.load(vz + vsptr, mask=smask, other=0.0), mrow + start + full * 128, left, mw,
                                      mt, q_b, qg, neg_m, m_i, l_i, acc, KBITS, VBITS, VPAIRS, HAS_MASK, True)
        else:  # a ring of STAGES tiles in shared memory, filled by cp.async STAGES - 1 tiles ahead
            KSC: gl.constexpr = _layout("ksc")
            cw = _index(W, KSC, 3, 0)
            kscp = ((start + cw * 32) // 32).to(gl.int64) * sks_t + _index(4, KSC, 3, 1) * 32 + _index(32, KSC, 3, 2)
            vscur = vs + vsptr  # the current tile's value scales/zeros, when read directly (not VPAIRS)
            vzcur = vz + vsptr
            for t0 in gl.static_range(STAGES - 1):
                kptr, kscp, vptr, hptr, vsptr = _issue(
                    kbuf.index(t0), vbuf.index(t0), hbuf.index(t0), ksbuf.index(t0), kzbuf.index(t0), vsbuf.index(t0),
                    vzbuf.index(t0), kptr, vptr, hptr, ks, kz, kscp, vs, vz, vsptr, ktok, vpair, hpair, cw, spair,
                    size - t0 * 128, skc_t, sks_t, svc_t, svs_t, VPAIRS, VBITS == 3)
            for it in range(full):
                async_copy.wait_group(STAGES - 2)
                gl.thread_barrier()  # tile it is visible to all; every thread is done with tile it - 1's slot
                t = (it + STAGES - 1) % STAGES
                kptr, kscp, vptr, hptr, vsptr = _issue(
                    kbuf.index(t), vbuf.index(t), hbuf.index(t), ksbuf.index(t), kzbuf.index(t), vsbuf.index(t),
                    vzbuf.index(t), kptr, vptr, hptr, ks, kz, kscp, vs, vz, vsptr, ktok, vpair, hpair, cw, spair,
                    size - (it + STAGES - 1) * 128, skc_t, sks_t, svc_t, svs_t, VPAIRS, VBITS == 3)
                m_i, l_i, acc = _staged_tile(kbuf, vbuf, hbuf, ksbuf, kzbuf, vsbuf, vzbuf, it % STAGES, vscur, vzcur,
                                             mrow + start + it * 128, 128, spair, mw, mt, q_b, qg, neg_m, m_i, l_i,
                                             acc, KBITS, VBITS, VPAIRS, HAS_MASK, False)
                vscur += 128 * svs_t
                vzcur += 128 * svs_t
            if full * 128 < size:
                async_copy.wait_group(STAGES - 2)
                gl.thread_barrier()
                m_i, l_i, acc = _staged_tile(kbuf, vbuf, hbuf, ksbuf, kzbuf, vsbuf, vzbuf, full % STAGES, vscur,
                                             vzcur, mrow + start + full * 128, size - full * 128, spair, mw, mt, q_b,
                                             qg, neg_m, m_i, l_i, acc, KBITS, VBITS, VPAIRS, HAS_MASK, True)
            async_copy.wait_group(0)
    else:  # the residual window, plain channel order
        q = gl.load(QR + b * sqr_b + qrow * sqr_h + kap, mask=qmask, other=0.0).to(gl.float32)
        q_b = gl.convert_layout((q * qk_scale_r).to(gl.float16), B_OP, assert_trivial=True)
        rtok = _index(W, RL, 4, 0) * 32 + _index(32, RL, 4, 1)
        rch = _index(8, RL, 4, 2) * 16 + _index(16, RL, 4, 3)
        kr = KR + b * skr_b + h * skr_h + rtok.to(gl.int64) * skr_t + rch
        vr = VR + b * svr_b + h * svr_h + rtok.to(gl.int64) * svr_t + rch
        for r0 in range(0, n_r, 128):
            live = rtok < n_r - r0
            k = gl.load(kr + r0 * skr_t, mask=live, other=0.0).to(gl.float16)
            k_a = gl.convert_layout(gl.reshape(k, [W, 32, D]), A_OP)
            s = mma_v2(k_a, q_b, gl.zeros([W, 32, BH], gl.float32, layout=MMA))
            valid = mw * 32 + mt < n_r - r0
            if HAS_MASK:
                valid = valid & (gl.load(mrow + n_q + r0 + mw * 32 + mt, mask=valid, other=0) != 0)
            m_i, l_i, acc, p16 = _softmax_t(gl.where(valid, s, float("-inf")), m_i, l_i, acc)
            p_b = _transpose_p(p16, B_OP)
            v = gl.load(vr + r0 * svr_t, mask=live, other=0.0).to(gl.float16)
            v5 = gl.reshape(v, [W, 32, 8, 8, 2])  # w n u xb e -> nu = 16 xb + 8 e + u
            v_a = gl.convert_layout(gl.permute(gl.reshape(gl.permute(v5, [0, 1, 3, 4, 2]), [W, 32, D]), [0, 2, 1]),
                                    A_OP)
            acc = mma_v2(v_a, p_b, acc)

    # the warps' partial results merged into the program's one (a cross-warp reduction through shared memory):
    # the merge kernel then reads one row per program
    m_p = gl.max(m_i, axis=0)
    alpha = gl.where(m_i == float("-inf"), 0.0, gl.exp2(m_i - gl.expand_dims(gl.where(m_p == float("-inf"), 0.0,
                                                                                      m_p), 0)))
    l_p = gl.sum(l_i * alpha, axis=0)
    o_p = gl.sum(acc * gl.expand_dims(alpha, 1), axis=0)  # [D (nu), BH]
    OL: gl.constexpr = gl.SliceLayout(0, MMA)
    onu = _index(D, OL, 2, 0)
    oh = _index(BH, OL, 2, 1)
    row = ((b * HKV + h) * GROUP + oh) * NUM_SPLITS + split
    gl.store(PO + row * D + 16 * (onu & 7) + (onu >> 3), o_p, mask=(oh < GROUP) & (onu >= 0))
    sh = gl.arange(0, BH, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
    srow = ((b * HKV + h) * GROUP + sh) * NUM_SPLITS + split
    gl.store(PM + srow, m_p, mask=sh < GROUP)
    gl.store(PL + srow, l_p, mask=sh < GROUP)



# ---------------------------------------------------------------------------------------------------- host side
LOG2E = 1.4426950408889634


def supported(k_packed, v_packed, head_dim: int) -> bool:
    """Whether :func:`decode_attention` reads this layer's packed storage: KIVI with 32-token key groups
    in channel word order and 32-channel value groups along head_dim, head_dim 128, 2-, 4- or 8-bit keys,
    2-, 4- or 8-bit values, or 3-bit values (bit planes) in token pairs."""
    return (head_dim == 128 and k_packed.granularity == "per_channel" and k_packed.group_size == 32
            and k_packed.channel_words and not k_packed.token_block and k_packed.bits in (2, 4, 8)
            and v_packed.granularity == "per_token" and v_packed.group_size == 32 and not v_packed.channel_words
            and not v_packed.token_block
            and (v_packed.bits in (2, 4, 8) or (v_packed.bits == 3 and v_packed.token_pairs)))


def decode_attention(q, k_packed, k_residual, v_packed, v_residual, scaling, kv_mask=None, out_scale=1.0, *,
                     lengths=None, rotate_out=False, q_residual=None, scaling_residual=None, splits=None,
                     stages=None):
    """:func:`kvtuner.kernels.decode_attention`'s contract (packed history, then the residual window;
    ``lengths`` for CUDA-graph replay; ``rotate_out`` / ``q_residual`` / ``scaling_residual`` for rotated
    layers) on the storage :func:`supported` accepts; ``stages``: tiles copied ahead (:func:`_launch`).
    Returns ``[B, 1, Hq, 128]`` in ``q.dtype``."""
    _, hq, one, d = q.shape
    if k_packed is None or v_packed is None or not supported(k_packed, v_packed, d):
        raise ValueError("the Gluon decode kernel reads KIVI G = 32 storage at head_dim 128: 2-, 4- or 8-bit keys in "
                         "channel word order, 2-, 4- or 8-bit values, 3-bit values in token pairs; allowed: such a "
                         "packed history (else kvtuner.kernels.decode_attention)")
    hkv, n = k_packed.codes.shape[1], k_packed.num_tokens
    if lengths is not None:  # static buffers: the counts are on the device, both capacities bound them
        n = min(n, v_packed.num_tokens) // 32 * 32
    if one != 1 or hq % hkv or hq // hkv > 16 or n % 32 or n == 0 or v_packed.num_tokens < n:
        raise ValueError(f"q {tuple(q.shape)} over {n} packed tokens of {hkv} KV heads; allowed: one query token, "
                         "up to 16 query heads per KV head, whole 32-token groups")
    return _launch(q, k_packed.codes, k_packed.scale, k_packed.zero, v_packed.codes, v_packed.scale, v_packed.zero,
                   scaling, k_packed.bits, v_packed.bits, k_residual, v_residual, q_residual, scaling_residual,
                   kv_mask, lengths, out_scale, rotate_out, splits, value_pairs=v_packed.token_pairs, n=n,
                   stages=stages)


decode_attention.fuses_rotation = True  # kvtuner.attention.rotated_decode hands it the output's rotation


def decode_packed(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, scaling, kbits, vbits, k_residual=None,
                  v_residual=None, q_residual=None, scaling_residual=None, splits=None, value_pairs=True,
                  programs_per_sm=None, maxnreg=None, stages=None):
    """Attention of ``q`` ``[B, Hq, 1, 128]`` over a packed history of ``kbits``/``vbits`` codes (keys 2, 4 or
    8 bits, values 2, 3, 4 or 8) followed by an optional full-precision residual window ``[B, Hkv, R, 128]``:
    keys per channel in groups of 32 tokens, codes in channel word order (``quant.to_channel_words``); values
    per token in groups of 32 channels, codes and scales/zeros in token pairs (``quant.to_token_pairs``, the
    cache's layout for Gluon layers; ``value_pairs=False``: packed along head_dim per token, paired in
    registers, not for 3 bits). ``q_residual`` / ``scaling_residual``: the residual's query and scale (rotated
    layers). ``programs_per_sm`` / ``maxnreg`` / ``stages``: the launch (split count, register cap, ring
    depth) instead of :func:`_launch`'s default, for sweeps. Returns ``[B, 1, Hq, 128]`` in ``q.dtype``."""
    _, hq, one, d = q.shape
    _, hkv, n, width = k_codes.shape
    if (kbits not in (2, 4, 8) or vbits not in (2, 3, 4, 8) or (vbits == 3 and not value_pairs)
            or width != 16 * kbits or v_codes.shape[-1] != 16 * vbits):
        raise ValueError(f"bits ({kbits}, {vbits}) with code rows of {width} and {v_codes.shape[-1]} bytes; allowed: "
                         "2-, 4- or 8-bit keys, 2-, 4- or 8-bit values or 3-bit values in token pairs, rows of "
                         "head_dim * bits / 8 bytes")
    if d != 128 or one != 1 or hq % hkv or hq // hkv > 16 or n % 32 or n == 0:
        raise ValueError(f"decode_packed covers head_dim 128, up to 16 query heads per KV head and whole 32-token "
                         f"groups; got q {tuple(q.shape)}, key codes {tuple(k_codes.shape)}")
    return _launch(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, scaling, kbits, vbits, k_residual,
                   v_residual, q_residual, scaling_residual, None, None, 1.0, False, splits, value_pairs,
                   programs_per_sm=programs_per_sm, maxnreg=maxnreg, stages=stages)


def ring_stages(requested, kbits, vbits):
    """The ring depth for a layer of ``kbits`` / ``vbits`` codes when ``requested`` stages are asked for: at
    most 2 with 8-bit codes (a third 36 KB stage would leave one program per SM)."""
    return min(requested, 2) if max(kbits, vbits) == 8 else requested


def _resident(kbits, vbits, bh, value_pairs, stages):
    """Programs of the split kernel one SM holds at once: registers (sm_90 compiles: 168 per thread, capped
    there, with 2- or 4-bit codes and up to 8 query heads per KV head, 230-255 otherwise; 64 K per SM, 128
    threads a program) and shared memory (each stage: key and value codes, key scales/zeros, value
    scales/zeros in token pairs)."""
    by_regs = 3 if max(kbits, vbits) <= 4 and vbits != 3 and bh == 8 else 2
    stage = 2048 * (kbits + vbits) + 2048 + (4096 if value_pairs else 0)
    return max(1, min(by_regs, (227 * 1024) // (stages * stage + 2048)))


def _default_splits(rows, tiles, resident):
    """Splits of each row's history: with fewer rows than resident programs, one wave of as many splits as fit
    beside the rows' residual programs; else the count (up to 8) whose programs fill their last wave best, the
    smallest within 3 %."""
    if 2 * rows <= resident:
        return max(1, min(tiles, resident // rows - 1))
    fill = {k: rows * k / (-(-rows * k // resident) * resident) for k in range(1, min(tiles, 8) + 1)}
    best = max(fill.values())
    return min(k for k, f in fill.items() if f >= best - 0.03)


def _rows(t):
    """Batch and head strides of packed rows, and their row length (the token stride the kernel is compiled for)."""
    return t.stride(0), t.stride(1), t.shape[-1]


def _launch(q, kc, ks, kz, vc, vs, vz, scaling, kbits, vbits, k_residual, v_residual, q_residual, scaling_residual,
            kv_mask, lengths, out_scale, rotate_out, splits, value_pairs, n=None, programs_per_sm=None, maxnreg=None,
            stages=None):
    """The split launch over ``splits`` ranges of the packed history (``n`` tokens, default all of ``kc``) plus
    the residual's program, then the merge of their partial results (one per program). ``stages`` 0
    (default): tiles loaded straight into registers, about four programs per SM when (batch x KV heads) rows
    fill the GPU, else one wave of three per SM under a 168-register cap, codes of at most 4 bits and up to 8
    query heads per KV head, two per SM otherwise (measured on an H100: ``docs/kernels.md``). ``stages`` > 0: a cp.async ring of
    that many tiles, split to fill whole waves of resident programs (:func:`_default_splits`; not yet measured
    on a GPU). ``programs_per_sm``: about that many programs per SM instead, for sweeps."""
    import torch
    import triton

    from .decode_kernel import merge_kernel

    b, hq, _, d = q.shape
    hkv = kc.shape[1]
    n = kc.shape[2] if n is None else n
    for t in (kc, ks, kz, vc, vs, vz):
        if t.stride(-1) != 1 or (t.shape[-2] > 1 and t.stride(-2) != t.shape[-1]):
            raise ValueError(f"packed rows of shape {tuple(t.shape)} and strides {t.stride()}; allowed: contiguous rows "
                             "(token stride = row length), as the cache and quant.quantize lay them out")
    if ks.stride()[:2] != kz.stride()[:2] or vs.stride()[:2] != vz.stride()[:2]:
        raise ValueError("scales and zeros of one tensor must share strides")
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    kv_rows, tiles, bh = b * hkv, triton.cdiv(n, 128), 8 if hq // hkv <= 8 else 16
    stages = stages or 0
    per_sm = programs_per_sm
    if per_sm is None and not stages:  # plain loads: the launch measured on an H100 (docs/kernels.md)
        per_sm = 2
        if max(kbits, vbits) <= 4 and bh == 8:
            per_sm, maxnreg = (4, maxnreg) if kv_rows >= sms else (3, maxnreg or 168)
    if splits:
        nqs = splits
    elif per_sm is not None:
        nqs = max(1, min(tiles, triton.cdiv(per_sm * sms, kv_rows)))
    else:
        resident = _resident(kbits, vbits, bh, value_pairs, stages)
        if resident == 3:  # three programs' registers: at most 168 each (ptxas picks 168-176 unasked)
            maxnreg = maxnreg or 168
        nqs = _default_splits(kv_rows, tiles, sms * resident)
    per = triton.cdiv(triton.cdiv(n, nqs), 128) * 128
    nqs = triton.cdiv(n, per)
    num_splits = nqs + 1
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
        q.stride(0), q.stride(1), qr.stride(0), qr.stride(1), *_rows(kc), *_rows(ks), *_rows(vc), *_rows(vs),
        *kr.stride()[:3], *vr.stride()[:3],
        mask.stride(0) if kv_mask is not None else 0, n, kr.shape[2], per, nqs, float(scaling) * LOG2E,
        float(scaling if scaling_residual is None else scaling_residual) * LOG2E, hkv, hq // hkv, num_splits,
        KBITS=kbits, VBITS=vbits, VPAIRS=value_pairs, HAS_MASK=kv_mask is not None, DEV_LEN=lengths is not None,
        BH=bh, STAGES=stages, num_warps=4,
        **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    out = torch.empty(b, 1, hq, d, device=q.device, dtype=q.dtype)
    merge_kernel[(b * hq,)](po, pm, pl, out, out.stride(0), out.stride(2), hq, num_splits, float(out_scale), D=d,
                            BLOCK_D=d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), ROT_O=bool(rotate_out),
                            LOG_D=d.bit_length() - 1, RES_SPLITS=1)
    return out
