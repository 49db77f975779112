"""Triton kernels against the PyTorch reference.

On a machine without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) on a
few small cases, so their logic is checked in CI; with CUDA the full matrix runs on the GPU
(bits x head_dim x GQA ratio x odd lengths x ragged batch x empty history x int64 offsets).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

if importlib.util.find_spec("triton") is None:
    pytest.skip("needs Triton (pip install 'kvtuner[dev]' for its CPU interpreter, 'kvtuner[gpu]' on a GPU)",
                allow_module_level=True)
if not CUDA:
    import numpy

    if tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip("Triton 3.6's interpreter needs numpy < 2.4 (loops index with 1-element arrays)",
                    allow_module_level=True)

from kvtuner import KernelPolicy, KVPlan, MixedPrecisionCache, kernels, quant, with_cache  # noqa: E402
from kvtuner.attention import decode_attention as reference  # noqa: E402
from kvtuner.kernels import launch_config  # noqa: E402
from kvtuner.kernels.decode import split_launcher  # noqa: E402
from kvtuner.kernels.decode_kernel import split_kernel  # noqa: E402
from kvtuner.testing import tiny_model  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu  # conftest skips these without a CUDA GPU and Triton


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_case(b, hkv, group, d, n_q, n_r, kbits, vbits, *, k_gran="per_channel", gk=32, gv=None,
              dtype=torch.float16, seed=0, vt=0, key_words=False, value_words=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = torch.randn(b, hkv, n_q + n_r, d, generator=g).to(DEV, dtype)
    k = k + torch.randn(1, 1, 1, d, generator=g).to(DEV, dtype) * 3  # channel outliers, as in real keys
    v = torch.randn(b, hkv, n_q + n_r, d, generator=g).to(DEV, dtype)
    q = torch.randn(b, hkv * group, 1, d, generator=g).to(DEV, dtype)
    kp = quant.quantize(k[..., :n_q, :], kbits, k_gran, gk) if n_q else None
    vp = quant.quantize(v[..., :n_q, :], vbits, "per_token", gv) if n_q else None
    if vt and vp is not None:  # values in token blocks, as the cache keeps them for the kernel
        vp = quant.in_token_blocks(vp, vt)
    if key_words and kp is not None:  # keys in channel word order, as the cache keeps 4-bit keys beside them
        kp = quant.in_channel_words(kp)
    if value_words and vp is not None:  # 3-bit values as contiguous words (KernelPolicy.words3)
        vp = quant.in_channel_words(vp)
    kr = k[..., n_q:, :] if n_r else None
    vr = v[..., n_q:, :] if n_r else None
    return q, kp, kr, vp, vr


def torch_same_precision(q, kp, kr, vp, vr, scaling, mask=None):
    """What the unfused path computes: dequantize to the model dtype, then attention in that dtype."""
    parts_k = ([quant.dequantize(kp, q.dtype)] if kp is not None else []) + ([kr] if kr is not None else [])
    parts_v = ([quant.dequantize(vp, q.dtype)] if vp is not None else []) + ([vr] if vr is not None else [])
    k, v = torch.cat(parts_k, -2), torch.cat(parts_v, -2)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    m = None if mask is None else mask[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling)
    return out.transpose(1, 2)


def check(case, mask=None, slack=2.0, **launch):
    q, kp, kr, vp, vr = case
    d = q.shape[-1]
    ref32 = reference(q.float(), kp, None if kr is None else kr.float(), vp, None if vr is None else vr.float(),
                      d**-0.5, mask)
    out = kernels.decode_attention(q, kp, kr, vp, vr, d**-0.5, mask, **launch)
    assert out.shape == ref32.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    base = rel(torch_same_precision(q, kp, kr, vp, vr, d**-0.5, mask), ref32)
    err = rel(out, ref32)
    # the bound the issue sets: within 2x of torch at the same precision (plus a floor for fp32 ties)
    assert err <= slack * base + 1e-5, f"kernel error {err:.2e} vs torch {base:.2e}"
    return err, base


# ------------------------------------------------------------------ quantize + pack
QUANT_CASES = [(bits, gran, g, dt) for bits in (2, 4, 8)
               for gran, g in (("per_token", None), ("per_token", 32), ("per_channel", 32))
               for dt in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("bits,gran,group,dtype", QUANT_CASES if CUDA else QUANT_CASES[::3])
def test_quantize_matches_reference_exactly(bits, gran, group, dtype):
    x = (torch.randn(2, 3, 64, 64) * 3).to(DEV, dtype)
    a = quant.quantize(x, bits, gran, group)
    b = kernels.quantize(x, bits, gran, group)
    assert (a.group_size, a.granularity) == (b.group_size, b.granularity)
    assert a.codes.shape == b.codes.shape and a.scale.shape == b.scale.shape
    # Exact on the interpreter. On a GPU a few stored scales/zeros may sit one rounding step from
    # torch's (CUDA torch may turn a division into a multiplication by the reciprocal): bounded below.
    ca, cb = quant.unpack(a.codes, bits, 64).int(), quant.unpack(b.codes, bits, 64).int()
    assert (ca - cb).abs().max() <= 2 and (ca != cb).float().mean() <= 5e-3
    for pa, pb in ((a.scale, b.scale), (a.zero, b.zero)):
        assert (pa != pb).float().mean() <= 5e-3
        assert torch.allclose(pa.float(), pb.float(), rtol=2 ** -6, atol=0)
    if not CUDA:
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("meta", [None, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("gran,group", [("per_token", None), ("per_channel", 32)])
def test_quantize_metadata_dtype_and_saturation_match_reference(meta, gran, group):
    x = (torch.randn(1, 2, 64, 64) * 3).to(DEV, torch.bfloat16)
    x[0, 0, 3, 5], x[0, 1, 40, 7] = -2e5, 3e5  # past fp16's range: fp16 metadata saturates
    a, b = quant.quantize(x, 4, gran, group, meta), kernels.quantize(x, 4, gran, group, meta)
    assert a.scale.dtype == b.scale.dtype == (meta or torch.float16)
    for pa, pb in ((a.scale, b.scale), (a.zero, b.zero)):
        assert torch.isfinite(pb.float()).all()
        assert torch.allclose(pa.float(), pb.float(), rtol=2 ** -6, atol=0)
    if not CUDA:
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


def test_quantize_falls_back_on_tails():
    x = torch.randn(1, 1, 40, 64).to(DEV, torch.float16)  # 40 tokens: a short key group
    a, b = quant.quantize(x, 4, "per_channel", 32), kernels.quantize(x, 4, "per_channel", 32)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


# ------------------------------------------------------------------ fused decode attention
SMALL = [
    dict(b=2, hkv=2, group=4, d=64, n_q=96, n_r=5, kbits=4, vbits=2),
    dict(b=1, hkv=1, group=1, d=64, n_q=64, n_r=33, kbits=8, vbits=8, k_gran="per_token", gk=None),
    dict(b=2, hkv=2, group=8, d=64, n_q=32, n_r=3, kbits=2, vbits=4, gv=32),
    dict(b=1, hkv=2, group=4, d=64, n_q=0, n_r=17, kbits=4, vbits=4),  # empty history: residual only
    dict(b=1, hkv=1, group=4, d=64, n_q=64, n_r=0, kbits=2, vbits=8, k_gran="per_token", gk=None),
    dict(b=1, hkv=2, group=4, d=64, n_q=64, n_r=3, kbits=3, vbits=6),  # bit-plane codes
    dict(b=1, hkv=1, group=2, d=64, n_q=32, n_r=1, kbits=6, vbits=3, gv=32),
]


@pytest.mark.parametrize("case", SMALL, ids=lambda c: f"K{c['kbits']}V{c['vbits']}-q{c['n_q']}-r{c['n_r']}")
def test_decode_matches_reference(case):
    check(make_case(**case))


ORIENTATIONS = [dict(swap_qk=False, swap_pv=False), dict(swap_qk=False, swap_pv=True), dict(swap_qk=True, swap_pv=False)]


@pytest.mark.parametrize("launch", ORIENTATIONS, ids=lambda o: f"qk{int(o['swap_qk'])}-pv{int(o['swap_pv'])}")
@pytest.mark.parametrize("case", [SMALL[0], SMALL[5]], ids=("K4V2", "K3V6"))
def test_decode_orientations_agree(case, launch):
    # every MMA orientation computes the same attention (the defaults pick one per bit pair)
    check(make_case(**case), **launch)


FOLDS = [dict(fold_k=k, fold_v=v) for k, v in (("reg", "reg"), ("plain", "plain"), ("norm", "reg"))]


@pytest.mark.parametrize("launch", FOLDS, ids=lambda f: f"k-{f['fold_k']}-v-{f['fold_v']}")
@pytest.mark.parametrize("case", [SMALL[0], SMALL[5]], ids=("K4V2", "K3V6"))
def test_decode_scale_folds_agree(case, launch):
    # scales dequantized in registers, folded into q / p with or without max-normalisation: same attention
    check(make_case(**case), **launch)


@gpu  # inline PTX unpacking: not in the interpreter
@pytest.mark.parametrize("asm", [False, True])
@pytest.mark.parametrize("kbits,vbits", [(2, 2), (4, 4), (8, 8), (3, 6), (6, 3), (2, 8)])
def test_gpu_ptx_unpack_matches(kbits, vbits, asm):
    check(make_case(2, 2, 4, 128, 300, 9, kbits, vbits, gk=128), asm=asm)


@gpu  # inline PTX unpacking: not in the interpreter
@pytest.mark.parametrize("how", sorted(launch_config.UNPACK3))
@pytest.mark.parametrize("d,kbits,vbits", [(48, 3, 3), (64, 3, 2), (128, 3, 3), (128, 4, 3), (256, 3, 8), (80, 3, 3),
                                           (40, 3, 3)])
def test_gpu_three_bit_unpackers(d, kbits, vbits, how):
    # both planes of a 3-bit code per PTX call, by word (head_dim % 16 == 0, else planes) or by
    # byte + nibble (head_dim % 8 == 0): the same attention as plane by plane
    check(make_case(2, 2, 4, d, 300, 9, kbits, vbits, gk=128), unpack3_k=how, unpack3_v=how)


def test_decode_rejects_bad_launch():
    q, kp, kr, vp, vr = make_case(1, 2, 4, 64, 64, 4, 4, 4)
    with pytest.raises(ValueError, match="at most one"):
        kernels.decode_attention(q, kp, kr, vp, vr, 0.1, swap_qk=True, swap_pv=True)
    with pytest.raises(ValueError, match="fold_k='fast' is invalid"):
        kernels.decode_attention(q, kp, kr, vp, vr, 0.1, fold_k="fast")
    with pytest.raises(ValueError, match="unpack3_v='bytes' is invalid"):
        kernels.decode_attention(q, kp, kr, vp, vr, 0.1, unpack3_v="bytes")
    if not CUDA:
        with pytest.raises(ValueError, match="inline PTX"):
            kernels.decode_attention(q, kp, kr, vp, vr, 0.1, asm=True)


TOKEN_BLOCKED = [
    dict(b=2, hkv=2, group=4, d=64, n_q=96, n_r=5, kbits=4, vbits=2, vt=32),
    dict(b=1, hkv=2, group=4, d=64, n_q=128, n_r=3, kbits=2, vbits=3, gk=64, vt=64),
    dict(b=2, hkv=1, group=8, d=64, n_q=64, n_r=7, kbits=8, vbits=4, gv=32, vt=32),  # value groups of 32 channels
    dict(b=1, hkv=2, group=1, d=32, n_q=96, n_r=0, kbits=3, vbits=4, vt=32),
]


@pytest.mark.parametrize("case", TOKEN_BLOCKED, ids=lambda c: f"K{c['kbits']}V{c['vbits']}-vt{c['vt']}")
def test_decode_token_blocked_values(case):
    # the same attention as with values packed along head_dim (one tile per token block)
    blocked = make_case(**case)
    check(blocked)
    plain = make_case(**{**case, "vt": 0})
    args = (blocked[0].shape[-1] ** -0.5,)
    out_b = kernels.decode_attention(*blocked, *args)
    out_p = kernels.decode_attention(*plain, *args, block_n=case["vt"])
    assert rel(out_b, out_p) < 2e-3
    with pytest.raises(ValueError, match="token blocks of"):
        kernels.decode_attention(*blocked, *args, block_n=case["vt"] // 2)


@pytest.mark.parametrize("kbits,vbits,k_gran,gk,vt,d", [(4, 4, "per_channel", 32, 32, 64), (2, 2, "per_channel", 32, 0, 64),
                                                     (4, 2, "per_token", None, 0, 64), (3, 4, "per_channel", 64, 64, 64),
                                                     (3, 3, "per_channel", 32, 0, 64), (3, 2, "per_channel", 32, 0, 40),
                                                     (3, 8, "per_token", None, 0, 64), (6, 3, "per_channel", 32, 0, 64)])
def test_decode_keys_in_channel_word_order(kbits, vbits, k_gran, gk, vt, d):
    # 3-bit keys in word order are contiguous 24-bit words (quant.to_channel_words), read by their own unpacker
    case = dict(b=2, hkv=2, group=4, d=d, n_q=128, n_r=5, kbits=kbits, vbits=vbits, k_gran=k_gran, gk=gk, vt=vt)
    worded = make_case(**case, key_words=True)
    assert worded[1].channel_words
    check(worded)
    args = (d ** -0.5,)
    assert rel(kernels.decode_attention(*worded, *args), kernels.decode_attention(*make_case(**case), *args)) < 2e-3
    if not vt and d == 64 and vbits != 3:  # word order for values: 3-bit values packed along head_dim only
        q, kp, kr, vp, vr = worded
        vw = quant.in_channel_words(vp)
        with pytest.raises(ValueError, match="3-bit values packed along head_dim"):
            kernels.decode_attention(q, kp, kr, vw, vr, *args)


@pytest.mark.parametrize("kbits,gv,d", [(3, 32, 64), (4, None, 64), (2, None, 40), (3, 16, 64), (4, None, 48)])
def test_decode_three_bit_values_in_contiguous_words(kbits, gv, d):
    # 3-bit values packed along head_dim as contiguous 24-bit words (quant.to_channel_words, KernelPolicy.words3)
    case = dict(b=2, hkv=2, group=4, d=d, n_q=96, n_r=5, kbits=kbits, vbits=3, gk=32, gv=gv)
    worded = make_case(**case, value_words=True, key_words=kbits == 3)
    assert worded[3].channel_words
    check(worded)
    args = (d ** -0.5,)
    assert rel(kernels.decode_attention(*worded, *args), kernels.decode_attention(*make_case(**case), *args)) < 2e-3
    blocked = make_case(**dict(case, gv=None, d=64), vt=32)
    q, kp, kr, vp, vr = blocked
    with pytest.raises(ValueError, match="already re-laid"):  # token blocks and words do not combine
        quant.in_channel_words(vp)


@pytest.mark.parametrize("k_rot,v_rot", [(True, True), (True, False), (False, True)])
def test_rotation_in_the_kernel_matches_the_matmuls(k_rot, v_rot):
    # rotated layers pack k H / v H and keep their residual plain: the kernel's fast Walsh-Hadamard
    # transforms (rotate_out, and rotate_q) = attention over the packed history rotated back
    from kvtuner.attention import rotated_decode

    q, kp, kr, vp, vr = make_case(2, 2, 4, 64, 64, 9, 4, 2)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(2, 2, 64, 64, generator=g).to(DEV, q.dtype)
    if k_rot:  # keys with outlier channels, rotated before they are quantized
        kp = quant.quantize(quant.rotate(x + torch.randn(64, generator=g).to(DEV, q.dtype) * 3), 4, "per_channel", 32)
    if v_rot:
        vp = quant.quantize(quant.rotate(x.flip(-1)), 2, "per_token", None)
    fused = rotated_decode(kernels.decode_attention, q, kp, kr, vp, vr, 0.125, None, k_rot, v_rot)
    ref = rotated_decode(reference, q.float(), kp, kr.float(), vp, vr.float(), 0.125, None, k_rot, v_rot)
    plain_k = torch.cat([quant.rotate(quant.dequantize(kp, torch.float32)) if k_rot else
                         quant.dequantize(kp, torch.float32), kr.float()], -2)
    plain_v = torch.cat([quant.rotate(quant.dequantize(vp, torch.float32)) if v_rot else
                         quant.dequantize(vp, torch.float32), vr.float()], -2)
    truth = reference(q.float(), None, plain_k, None, plain_v, 0.125)
    assert rel(ref, truth) < 1e-6 and rel(fused, ref) < 5e-3
    rotated_q = reference(q.float(), kp, kr.float(), vp, vr.float(), 0.125)  # rotation ignored: far off
    assert rel(rotated_q, truth) > 20 * rel(fused, truth)
    d = q.shape[-1]  # both transforms in the kernels, the residual split on the plain query
    both = kernels.decode_attention(q, kp, kr, vp, vr, 0.125 / d ** 0.5 if k_rot else 0.125,
                                    out_scale=d ** -0.5 if v_rot else 1.0, rotate_q=k_rot, rotate_out=v_rot,
                                    scaling_residual=0.125)
    assert rel(both, fused) < 2e-3
    with pytest.raises(ValueError, match="power-of-two"):
        q48, kp48, kr48, vp48, vr48 = make_case(1, 1, 4, 48, 32, 3, 4, 4)
        kernels.decode_attention(q48, kp48, kr48, vp48, vr48, 0.1, rotate_q=True)
    with pytest.raises(ValueError, match="q_residual"):
        kernels.decode_attention(q, kp, kr, vp, vr, 0.1, q_residual=q[:1])


def test_decode_ragged_batch_mask():
    case = make_case(3, 2, 4, 64, 64, 7, 4, 4)
    mask = torch.ones(3, 71, dtype=torch.bool, device=DEV)
    mask[0, :20] = False  # left padding of different lengths
    mask[2, :45] = False
    check(case, mask)


def _in_capacity(qt, tokens):
    """``qt`` copied into a buffer with room for ``tokens`` tokens (garbage after the filled part)."""
    rows = -(-tokens // qt.group_size) if qt.granularity == "per_channel" else tokens

    def grow(t, n):
        out = torch.full((*t.shape[:-2], n, t.shape[-1]), 7, dtype=t.dtype, device=t.device)
        out[..., : t.shape[-2], :] = t
        return out

    return quant.QuantizedTensor(grow(qt.codes, tokens), grow(qt.scale, rows), grow(qt.zero, rows), qt.bits,
                                 qt.granularity, qt.group_size, qt.head_dim, qt.token_block, qt.channel_words)


@pytest.mark.parametrize("k_gran,n_q,n_r,vt", [("per_channel", 64, 5, 0), ("per_token", 37, 3, 0), ("per_channel", 0, 9, 0),
                                               ("per_channel", 64, 5, 32)])
def test_decode_device_lengths_match_sliced(k_gran, n_q, n_r, vt):
    """Static buffers + lengths on the device (CUDA-graph replay) = the same call on the filled parts."""
    q, kp, kr, vp, vr = make_case(2, 2, 4, 64, max(n_q, 32), n_r, 4, 2, k_gran=k_gran, vt=vt)
    if n_q == 0:  # empty history: buffers exist but count nothing
        kr, vr = (torch.cat([t, r], -2)[..., 32:, :] for t, r in
                  ((quant.dequantize(kp, q.dtype), kr), (quant.dequantize(vp, q.dtype), vr)))
    cap_q, cap_r = 160, 16
    # capacities may differ (key groups round up; token-blocked values hold whole blocks)
    kb, vb = _in_capacity(kp, cap_q), _in_capacity(vp, cap_q - (0 if vt else 5))
    kres = torch.full((*kr.shape[:2], cap_r, kr.shape[-1]), 9.0, dtype=kr.dtype, device=DEV)
    vres = kres.clone()
    kres[..., :n_r, :], vres[..., :n_r, :] = kr, vr
    unit = quant.length_unit(kb)
    lengths = torch.tensor([n_q // unit, n_r], dtype=torch.int32, device=DEV)
    mask = torch.ones(2, cap_q + cap_r, dtype=torch.bool, device=DEV)
    mask[1, :3] = False
    want = kernels.decode_attention(q, kp if n_q else None, kr, vp if n_q else None, vr, 0.125,
                                          mask[:, : n_q + n_r])
    got = kernels.decode_attention(q, kb, kres, vb, vres, 0.125, mask, lengths=lengths)
    ref = reference(q, kb, kres, vb, vres, 0.125, mask, lengths=lengths)
    assert rel(got, want) < 1e-3, rel(got, want)
    assert rel(ref, want) < 1e-2
    with pytest.raises(ValueError, match="lengths"):
        kernels.decode_attention(q, kb, kres, vb, vres, 0.125, lengths=lengths.float())


def test_decode_rejects_bad_input():
    q, kp, kr, vp, vr = make_case(1, 2, 4, 64, 64, 4, 4, 4)
    with pytest.raises(ValueError, match="one decode token"):
        kernels.decode_attention(q.expand(1, 8, 2, 64), kp, kr, vp, vr, 0.1)
    with pytest.raises(ValueError, match="differ"):
        kernels.decode_attention(q, kp, kr, quant.slice_tokens(vp, 0, 32), vr, 0.1)


def test_int64_offsets_bound():
    # 128 sequences x 8 heads x 34k tokens x 64 bytes passes 2^31: the kernel's offsets must be int64
    assert kernels.max_int32_offset(128, 8, 34_000, 64)
    assert not kernels.max_int32_offset(1, 8, 4096, 64)


# ------------------------------------------------------------------ through generate()
@pytest.mark.parametrize("k,v,rot,blocks", [(4, 2, False, None), (8, 4, False, None), (4, 3, True, None),
                                           (4, 2, False, True), (2, 3, True, True), (3, 2, True, None)])
def test_generate_fused_matches_reference_path(k, v, rot, blocks):
    # blocks=True: values in token blocks and 4-bit keys in word order on both paths (value_token_blocks);
    # 3-bit keys and values packed along head_dim as contiguous words on both paths (words3)
    layouts = dict(value_token_blocks="on" if blocks else "auto", words3="on" if 3 in (k, v) else "auto")
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=32 if not CUDA else 64).to(DEV)
    model.set_attn_implementation("sdpa")
    plan = KVPlan.uniform(2, k, v, "kivi", rotation=rot)
    ids = torch.randint(3, 128, (2, 70), generator=torch.Generator().manual_seed(0)).to(DEV)
    outs = {}
    try:
        for backend in ("torch", "triton"):
            cache = MixedPrecisionCache(plan, model.config, policy=KernelPolicy(backend, **layouts))
            with torch.no_grad():
                logits = model(ids, **with_cache(model, cache)).logits[:, -1:]
                steps = [logits]
                for t in range(12):
                    nxt = steps[-1].argmax(-1)
                    steps.append(model(nxt, **with_cache(model, cache)).logits)
            outs[backend] = (torch.cat(steps, 1), cache)
    finally:
        model.config._attn_implementation = "sdpa"
    (ref, c_ref), (fused, c_fused) = outs["torch"], outs["triton"]
    assert model.config._attn_implementation == "sdpa"
    assert c_fused.layers[0].fused_attention and not c_ref.layers[0].fused_attention
    assert torch.equal(ref.argmax(-1), fused.argmax(-1))
    assert rel(fused, ref) < 2e-3
    assert c_fused.nbytes() == c_ref.nbytes() == plan.expected_nbytes(model.config, 70 + 12, batch_size=2, dtype_bytes=4)
    if blocks:  # the layouts were really used, on the fused path too
        assert c_fused.layers[0]._v.token_block == 32 and c_fused.layers[0]._k.channel_words == (k == 4)
    if k == 3:
        assert c_fused.layers[0]._k.channel_words and c_ref.layers[0]._k.channel_words
    if v == 3 and not blocks:
        assert c_fused.layers[0]._v.channel_words and c_ref.layers[0]._v.channel_words


@pytest.mark.parametrize("k,v,rot", [(4, 2, False), (2, 3, True)])
def test_fused_decode_with_sink_tokens_and_padding_matches_reference(k, v, rot):
    # sink tokens sit at the residual's front, so the kernel reads [packed, sink, newest]: the padding
    # mask (left padding masks sink and packed tokens of a short row) must be permuted to match
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=32 if not CUDA else 64).to(DEV)
    model.set_attn_implementation("sdpa")
    plan = KVPlan.uniform(2, k, v, "kivi", rotation=rot, sink_length=3)
    ids = torch.randint(3, 128, (2, 75), generator=torch.Generator().manual_seed(1)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # row 1: the sink and the first packed tokens are padding, the rest of the group is not
    outs = {}
    try:
        for backend in ("torch", "triton"):
            cache = MixedPrecisionCache(plan, model.config, policy=KernelPolicy(backend))
            am, pos = mask, (mask.cumsum(-1) - 1).clamp_min(0)
            with torch.no_grad():
                steps = [model(ids, attention_mask=am, position_ids=pos, **with_cache(model, cache)).logits[:, -1:]]
                for t in range(6):
                    am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
                    pos = pos[:, -1:] + 1
                    steps.append(model(steps[-1].argmax(-1), attention_mask=am, position_ids=pos,
                                       **with_cache(model, cache)).logits)
            outs[backend] = (torch.cat(steps, 1), cache)
    finally:
        model.config._attn_implementation = "sdpa"
    (ref, c_ref), (fused, c_fused) = outs["torch"], outs["triton"]
    layer = c_fused.layers[0]
    assert layer.fused_attention and layer._k.held_sink == 3 and layer._k.num_quantized == 32
    assert torch.equal(ref.argmax(-1), fused.argmax(-1))
    assert rel(fused, ref) < 2e-3


# ------------------------------------------------------------------ GPU matrix


GPU_MATRIX = ([(128, 4, k, v) for k in (2, 4, 8) for v in (2, 4, 8)]  # every pair at the common shape
              + [(d, g, k, v) for d in (64, 256) for g in (1, 8) for k, v in ((2, 2), (4, 2), (8, 4), (8, 8))]
              + [(d, 4, k, v) for d in (64, 128) for k, v in ((3, 3), (4, 3), (3, 2), (2, 3), (6, 4), (6, 6))])
# values in token blocks (what the cache stores on the GPU for KIVI values of 2-4 bits)
GPU_BLOCKED = [(d, g, k, v) for d in (64, 128, 256) for g in (1, 4, 8) for k, v in ((4, 2), (2, 2), (4, 4), (4, 3))] \
    + [(128, 4, k, v) for k, v in ((3, 3), (3, 2), (8, 4), (8, 3), (3, 4), (6, 4), (2, 3))]


@gpu
@pytest.mark.parametrize("d,group,kbits,vbits", GPU_MATRIX)
def test_gpu_matrix(d, group, kbits, vbits):
    for n_q, n_r, dtype in ((32 * 7, 19, torch.float16), (32 * 3, 33, torch.bfloat16)):
        check(make_case(3, 2, group, d, n_q, n_r, kbits, vbits, dtype=dtype))


@gpu
@pytest.mark.parametrize("d,group,kbits,vbits", GPU_BLOCKED)
def test_gpu_token_blocked_values(d, group, kbits, vbits):
    for n_q, n_r, gk, dtype in ((32 * 7, 19, 32, torch.float16), (128 * 3, 33, 128, torch.bfloat16),
                                (64 * 5, 0, 64, torch.float16)):
        check(make_case(3, 2, group, d, n_q, n_r, kbits, vbits, gk=gk, dtype=dtype, vt=gk))
        if kbits in (3, 4):  # 4-bit keys in channel word order, as the cache stores them here; 3-bit contiguous
            check(make_case(3, 2, group, d, n_q, n_r, kbits, vbits, gk=gk, dtype=dtype, vt=gk, key_words=True))


@gpu
@pytest.mark.parametrize("d,kbits,vbits,gk", [(128, 3, 2, 32), (128, 3, 3, 32), (128, 3, 4, 128), (64, 3, 3, 128),
                                              (40, 3, 4, 32), (256, 3, 3, 32), (80, 3, 2, 128), (128, 4, 3, 32),
                                              (128, 2, 3, 32), (48, 4, 3, 32)])
def test_gpu_contiguous_three_bit_codes(d, kbits, vbits, gk):
    # 3-bit keys and values in word order: contiguous 24-bit words through the PTX unpacker (_ASM3C), 16-bit
    # loads where head_dim % 16 == 0 and byte loads otherwise (head_dim 40, 48); values in KIVI's G-channel groups
    for n_q, n_r, dtype in ((gk * 5, 19, torch.float16), (gk * 3, 0, torch.bfloat16)):
        gv = gk if gk < d and not d & (d - 1) else None  # value groups only where head_dim is a power of two
        check(make_case(3, 2, 4, d, n_q, n_r, kbits, vbits, gk=gk, gv=gv, dtype=dtype,
                        key_words=kbits == 3, value_words=vbits == 3))


@gpu
@pytest.mark.parametrize("k_gran,gk,gv", [("per_token", None, None), ("per_token", 32, 32), ("per_channel", 128, None),
                                          ("per_channel", 32, 32)])
def test_gpu_layouts_and_ragged(k_gran, gk, gv):
    n_q = 256 if gk in (None, 128) else 96
    case = make_case(4, 8, 4, 128, n_q + (37 if k_gran == "per_token" else 0), 21, 4, 2, k_gran=k_gran, gk=gk, gv=gv)
    n = case[1].num_tokens + 21
    mask = torch.ones(4, n, dtype=torch.bool, device=DEV)
    for i, pad in enumerate((0, 5, 77, n - 3)):
        mask[i, :pad] = False
    check(case, mask)


@gpu
def test_gpu_past_int32_offsets():
    b, hkv, t, d = 130, 8, 33_024, 64  # 8-bit codes: 2.2e9 bytes in one buffer
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs >= 16 GiB of GPU memory")
    assert kernels.max_int32_offset(b, hkv, t, d)
    codes = torch.randint(0, 256, (b, hkv, t, d), dtype=torch.uint8, device=DEV)
    scale = torch.rand(b, hkv, t // 32, d, device=DEV, dtype=torch.float16) * 0.01
    zero = -torch.rand(b, hkv, t // 32, d, device=DEV, dtype=torch.float16)
    vscale = torch.rand(b, hkv, t, 1, device=DEV, dtype=torch.float16) * 0.01
    kp = quant.QuantizedTensor(codes, scale, zero, 8, "per_channel", 32, d)
    vp = quant.QuantizedTensor(codes, vscale, -vscale * 128, 8, "per_token", d, d)
    q = torch.randn(b, hkv * 4, 1, d, device=DEV, dtype=torch.float16)
    out = kernels.decode_attention(q, kp, None, vp, None, d**-0.5)
    last = slice(b - 1, b)
    ref = reference(q[last].float(), kp.map(lambda x: x[last]), None, vp.map(lambda x: x[last]), None, d**-0.5)
    assert rel(out[last], ref) < 5e-3


def test_launch_table_applies_per_tile_shape():
    table = kernels.launch_table()
    assert table, "the committed launch table (src/kvtuner/kernels/tables/h100.json) is missing or empty"
    assert {layout for _, _, layout in table} == set(kernels.LAYOUTS)
    (kb, vb, layout), entry = next(iter(table.items()))
    cpu = kernels.Target(8, False)
    tuned = kernels.launch_defaults(kb, vb, 128, 128, cpu, layout=layout)
    rules = kernels.launch_defaults(kb, vb, 128, 128, cpu, table=False, layout=layout)
    assert set(tuned) == set(rules)  # bookkeeping fields of the table never reach the launch
    assert all(tuned[k] == entry[k] for k in ("fold_k", "fold_v", "num_stages", "splits_per_sm", "swap_pv"))
    assert tuned["asm"] is False and tuned["maxnreg"] is None  # GPU-only choices stay off on the CPU
    other = kernels.launch_defaults(kb, vb, 64, 64, cpu, layout=layout)  # another tile: only the folds carry over
    assert (other["fold_k"], other["fold_v"]) == (entry["fold_k"], entry["fold_v"])
    assert other["num_stages"] == rules["num_stages"] and other["splits_per_sm"] == rules["splits_per_sm"]
    with pytest.raises(ValueError, match="layout='blocks' is invalid"):
        kernels.launch_defaults(kb, vb, 128, 128, cpu, layout="blocks")


def test_tiles_span_several_short_key_groups():
    # KIVI G = 32 (the plans' default): 128-token tiles over 4 key groups (64 for most 8-bit-key pairs,
    # the table's "groups" entries), measured 1.3-1.7x faster on an H100 than one group per tile
    table = kernels.launch_table()
    for (kb, vb, layout), entry in table.items():
        if layout == "groups":
            assert kernels.default_block_n(kb, vb, 128, 32) == entry["block_n"]
    assert kernels.default_block_n(4, 4, 128, 32) == 128
    assert kernels.default_block_n(8, 4, 128, 32) == 64  # 8-bit keys: 64-token tiles (128 spilled)...
    assert kernels.default_block_n(8, 3, 128, 32) == 64  # ... also by the rule where no entry exists
    assert kernels.default_block_n(4, 4, 64, 64) == 128  # SmolLM2's head_dim, G = 64
    assert kernels.default_block_n(4, 4, 128, 128) == 128  # one group per tile
    assert kernels.default_block_n(4, 4, 256, 32) == 32  # a 128-token tile of head_dim 256 is too big
    assert kernels.default_block_n(4, 4, 128, 48) == 48  # 48 does not divide 128
    assert kernels.default_block_n(4, 2, 128, 32, value_block=128) == 128
    assert kernels.default_block_n(4, 4, 128, None) == 64  # per-token keys
    cpu = kernels.Target(8, False)
    grouped = kernels.launch_defaults(4, 4, 128, 128, cpu, layout="groups")
    assert grouped["num_stages"] == table[4, 4, "groups"]["num_stages"] and grouped["dq16"] is True


@pytest.mark.parametrize("block_n", [32, 64, 128])
@pytest.mark.parametrize("dq16", [False, True])
@pytest.mark.parametrize("kbits,vbits,gv", [(4, 2, None), (4, 4, 32), (3, 3, 32), (8, 4, None)])
def test_decode_tiles_over_key_groups(kbits, vbits, gv, block_n, dq16):
    # 160 quantized tokens: a 128-token tile's groups past the end are masked, as are its rows;
    # value groups of 32 channels take the same fp16 / fp32 dequantization choice
    case = make_case(2, 2, 4, 64, 160, 7, kbits, vbits, gv=gv)
    err32, _ = check(case, block_n=block_n, dq16=dq16)
    assert err32 < 5e-3


def test_fewer_rows_than_sms_never_exceed_the_program_slots():
    # H100 at B = 16 (128 rows, 132 SMs): rounding the splits per row up gave per_sm + 1 of them, a
    # second wave for a few programs (KV4 446 -> 342 us at 16 x 32k with one wave). CPU counts 8 SMs.
    cpu = 8  # SMs, as Target.of counts a CPU device
    tiles = 1000
    splits, per = kernels.split_count(6, tiles * 64, 64, cpu, 4)  # 32 slots over 6 rows
    assert splits == 5 and 6 * splits <= 4 * 8 and splits * per >= tiles * 64
    assert kernels.split_count(4, tiles * 64, 64, cpu, 4)[0] == 8  # divides evenly: all 32 slots
    # rows >= SMs keep rounding up (the launch table's many-row entries were measured that way)
    assert kernels.split_count(12, tiles * 64, 64, cpu, 4)[0] == 3
    assert kernels.split_count(6, 3 * 64, 64, cpu, 4) == (3, 64)  # never more splits than tiles


def test_split_count_moves_to_fill_whole_waves():
    # CPU counts 8 SMs; 3 programs fit per SM -> waves of 24. 12 rows at per_sm 4 ask for 3 splits per
    # row: 36 programs, 1.5 waves; 2 splits fill one wave (H100, B = 24-96: 5-26 % faster)
    cpu, tiles = 8, 1000
    assert kernels.split_count(12, tiles * 64, 64, cpu, 4)[0] == 3  # no register cap known: unchanged
    assert kernels.split_count(12, tiles * 64, 64, cpu, 4, fit=3)[0] == 2
    # past 2.5 waves the count stays (moving measured slower at B = 64 and 128)
    assert kernels.split_count(40, tiles * 64, 64, cpu, 8, fit=3)[0] == 2
    # whole tiles decide the count launched: 3 tiles cannot make more than 3 splits
    assert kernels.split_count(12, 3 * 64, 64, cpu, 4, fit=3)[0] <= 3


def test_small_splits_fill_whole_waves_of_programs():
    # with fewer rows than SMs the split rounds down to per_sm programs per SM; per_sm must then be a
    # multiple of the programs whose registers fit on an SM, or the rest idle (H100: K4V4
    # with 128 registers 130 -> 104 us at 1 x 128k going from 3 to 4, K3V2 with 168 147 -> 109 from 4 to 3)
    checked = 0
    for key, entry in kernels.launch_table().items():
        cap = entry.get("maxnreg_small") or entry.get("maxnreg")
        if cap is None:  # uncapped: the register count is the compiler's, not the table's
            continue
        fit = kernels.programs_per_sm(cap, entry.get("num_warps", 4))
        per_sm = entry.get("splits_per_sm_small") or entry["splits_per_sm"]
        assert per_sm % fit == 0, (key, cap, per_sm, fit)
        checked += 1
    assert checked >= 25


def test_few_long_rows_take_their_own_split_and_register_cap():
    # K4V3 with token-blocked values: a 128-register cap at B = 64, 168 registers for few long rows
    # (H100: 116 -> 99 us at 1 x 128k, and 191 vs 198 us at 64 x 4k with 128)
    entry = kernels.launch_table()[4, 3, "tokens"]
    H100 = kernels.Target(132, True, "h100")
    given = (None,) * len(kernels.LAUNCH_KEYS)
    many = dict(zip(kernels.LAUNCH_KEYS, kernels.launch_choices(4, 3, 128, 128, H100, False, given, "tokens")))
    few = dict(zip(kernels.LAUNCH_KEYS, kernels.launch_choices(4, 3, 128, 128, H100, True, given, "tokens")))
    assert (many["maxnreg"], many["splits_per_sm"]) == (entry["maxnreg"], entry["splits_per_sm"])
    assert (few["maxnreg"], few["splits_per_sm"]) == (entry["maxnreg_small"], entry["splits_per_sm_small"])
    # KV4 at G = 32: 3 stages for many rows, 2 for few long rows (H100: 246 us at 64 x 4k; 3 stages
    # cost 107 -> 125 us at 1 x 128k)
    g44 = kernels.launch_table()[4, 4, "groups"]
    many44, few44 = (dict(zip(kernels.LAUNCH_KEYS,
                              kernels.launch_choices(4, 4, 128, 128, H100, small, given, "groups")))
                     for small in (False, True))
    assert (many44["num_stages"], few44["num_stages"]) == (g44["num_stages"], g44["num_stages_small"]) == (3, 2)
    cpu = dict(zip(kernels.LAUNCH_KEYS, kernels.launch_choices(4, 3, 128, 128, kernels.Target(8, False), True, given, "tokens")))
    assert cpu["maxnreg"] is None  # no register caps without PTX
    pinned = dict(zip(kernels.LAUNCH_KEYS, kernels.launch_choices(
        4, 3, 128, 128, H100, True, given[:7] + (96,) + given[8:], "tokens")))
    assert pinned["maxnreg"] == 96  # an explicit cap wins


def _compiled_variants(kernel) -> int:
    entry = kernel.device_caches[torch.cuda.current_device()]
    return len(next(c for c in entry if isinstance(c, dict)))


@gpu
def test_gpu_growing_residual_compiles_once():
    # lengths and strides that change every decode step are not specialised: a new variant would
    # cost about a second of compilation mid-generation whenever one turned divisible by 16
    g = torch.Generator(device="cpu").manual_seed(5)
    k = torch.randn(2, 2, 256 + 48, 128, generator=g).to(DEV, torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(2, 8, 1, 128, generator=g).to(DEV, torch.bfloat16)
    kp, vp = quant.quantize(k[..., :256, :], 4, "per_channel", 128), quant.quantize(v[..., :256, :], 2, "per_token")
    counts = []
    for n_r in range(15, 49):  # crosses 16, 32 and 48; the mask's row stride changes with it
        kr, vr = k[..., 256:256 + n_r, :].contiguous(), v[..., 256:256 + n_r, :].contiguous()
        mask = torch.ones(2, 256 + n_r, dtype=torch.bool, device=DEV)
        check((q, kp, kr, vp, vr), mask=mask)
        counts.append(_compiled_variants(split_kernel))
    assert counts[-1] == counts[0], f"compiled variants grew from {counts[0]} to {counts[-1]}"


@gpu  # the cached launch calls compiled CUDA binaries, not the interpreter
def test_gpu_cached_launch_runs_the_same_binaries():
    q, kp, kr, vp, vr = make_case(2, 2, 4, 128, 300, 9, 4, 2, gk=128)
    launcher = split_launcher
    launcher.cache.clear()
    first = kernels.decode_attention(q, kp, kr, vp, vr, 0.1)  # Triton's own launch, remembered
    hits = launcher.hits
    again = kernels.decode_attention(q, kp, kr, vp, vr, 0.1)
    assert launcher.enabled and launcher.hits == hits + 1
    assert torch.equal(first, again)
    # a query that is no longer 16-byte aligned needs another binary: a new key, then correct results
    q_odd = torch.empty(q.numel() + 1, device=DEV, dtype=q.dtype)[1:].view_as(q).copy_(q)
    out = kernels.decode_attention(q_odd, kp, kr, vp, vr, 0.1)
    assert launcher.hits == hits + 1 and len(launcher.cache) == 2
    torch.testing.assert_close(out, first, rtol=0, atol=0)
    # one more residual token changes only unspecialised integers: the same binary, directly
    k2 = torch.cat([kr, kr[:, :, :1]], 2)
    v2 = torch.cat([vr, vr[:, :, :1]], 2)
    kernels.decode_attention(q, kp, k2, vp, v2, 0.1)
    assert launcher.hits == hits + 2
    check((q, kp, k2, vp, v2))
