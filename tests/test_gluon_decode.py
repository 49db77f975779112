"""The Gluon decode prototype (``kernels/gluon_decode.py``) against the PyTorch reference on a GPU, and the
cache's choice of it (``KernelPolicy(decode="gluon")``) anywhere."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvtuner import KernelPolicy, KVPlan, quant
from kvtuner.spec import QuantSpec

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


def test_policy_chooses_the_gluon_kernel_where_it_reads_the_layer():
    pol = KernelPolicy(decode="gluon")
    lay = pol.layout(QuantSpec(4, "kivi"), QuantSpec(2, "kivi"), 128, "cuda")
    if not pol.use_triton("cuda"):
        pytest.skip("needs Triton")
    assert lay.gluon and lay.key_words and lay.value_pairs and not lay.value_block
    assert pol.layout(QuantSpec(4, "kivi"), QuantSpec(3, "kivi"), 128, "cuda").gluon  # 3-bit values: bit planes
    for k, v, d in ((3, 3, 128), (4, 4, 64), (4, 6, 128)):  # bits or head_dim it does not read
        assert not pol.layout(QuantSpec(k, "kivi"), QuantSpec(v, "kivi"), d, "cuda").gluon
    assert not pol.layout(QuantSpec(4, "kivi", 128), QuantSpec(4, "kivi", 128), 128, "cuda").gluon
    assert not KernelPolicy(decode="triton").layout(QuantSpec(4, "kivi"), QuantSpec(4, "kivi"), 128, "cuda").gluon
    assert not KernelPolicy().layout(QuantSpec(4, "kivi"), QuantSpec(4, "kivi"), 128, "cuda").gluon
    # "auto": Gluon only where it can run (a CUDA GPU of sm_80+, Triton with Gluon), never on the CPU
    from kvtuner.policy import gluon_runs_on

    runs = torch.cuda.is_available() and gluon_runs_on(torch.cuda.current_device())
    auto = KernelPolicy(decode="auto")
    assert auto.layout(QuantSpec(4, "kivi"), QuantSpec(4, "kivi"), 128, "cuda").gluon == runs
    assert not KernelPolicy(backend="triton", decode="auto").layout(QuantSpec(4, "kivi"), QuantSpec(4, "kivi"), 128,
                                                                     "cpu").gluon
    with pytest.raises(ValueError, match="decode"):
        KernelPolicy(decode="cuda")


def test_ring_depth_is_checked_and_kept_to_two_programs_per_sm():
    with pytest.raises(ValueError, match="decode_stages"):
        KernelPolicy(decode="gluon", decode_stages=1)
    pytest.importorskip("triton.experimental.gluon", reason="needs Triton with Gluon (3.5+)")
    from kvtuner.kernels.gluon_decode import ring_stages

    assert ring_stages(3, 4, 2) == 3 and ring_stages(3, 8, 4) == 2 and ring_stages(0, 8, 8) == 0


def _case(b, hkv, group, n_q, n_r, kbits, vbits, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    d = 128
    k = torch.randn(b, hkv, n_q + n_r, d, generator=g) + torch.randn(1, 1, 1, d, generator=g) * 3
    v = torch.randn(b, hkv, n_q + n_r, d, generator=g)
    q = torch.randn(b, hkv * group, 1, d, generator=g)
    k, v, q = (t.to("cuda", torch.bfloat16) for t in (k, v, q))
    kp = quant.in_channel_words(quant.quantize(k[..., :n_q, :], kbits, "per_channel", 32))
    vp = quant.quantize(v[..., :n_q, :], vbits, "per_token", 32)
    return q, kp, k[..., n_q:, :], vp, v[..., n_q:, :]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


SHAPES = [(4, 256, 32), (8, 96, 5), (1, 4096, 0), (4, 32, 40), (16, 160, 7)]


@gpu
@pytest.mark.parametrize("kbits,vbits,pairs,stages", [
    (4, 4, True, 0), (8, 8, True, 0), (4, 2, True, 0), (2, 2, True, 0), (8, 4, True, 0), (2, 8, True, 0),
    (4, 4, False, 0), (2, 8, False, 0), (4, 3, True, 0), (8, 3, True, 0), (4, 4, True, 3), (8, 8, True, 2),
    (4, 2, True, 3), (2, 2, True, 4), (2, 8, False, 3), (4, 3, True, 3)])
@pytest.mark.parametrize("group,n_q,n_r", SHAPES)
def test_gluon_decode_matches_the_reference(kbits, vbits, pairs, stages, group, n_q, n_r):
    # values in token pairs (the cache's layout for Gluon layers) or packed along head_dim; tiles loaded into
    # registers (stages 0) or through a cp.async ring
    from kvtuner.attention import decode_attention as reference
    from kvtuner.kernels import gluon_decode

    q, kp, kr, vp, vr = _case(3, 2, group, n_q, n_r, kbits, vbits)
    vp = quant.in_token_pairs(vp) if pairs else vp
    want = reference(q.float(), kp, kr.float(), vp, vr.float(), 128 ** -0.5)
    got = gluon_decode.decode_attention(q, kp, kr, vp, vr, 128 ** -0.5, stages=stages)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert _rel(got, want) < 5e-3
    mask = torch.ones(3, n_q + n_r, dtype=torch.bool, device="cuda")
    mask[0, : n_q // 2] = False  # left padding
    mask[2, 3] = False
    want = reference(q.float(), kp, kr.float(), vp, vr.float(), 128 ** -0.5, mask)
    assert _rel(gluon_decode.decode_attention(q, kp, kr, vp, vr, 128 ** -0.5, mask, stages=stages), want) < 5e-3


@gpu
def test_gluon_decode_reads_device_lengths_and_rotated_layers():
    from kvtuner.attention import decode_attention as reference
    from kvtuner.attention import rotated_decode
    from kvtuner.kernels import gluon_decode

    q, kp, kr, vp, vr = _case(2, 2, 4, 256, 40, 4, 2, seed=1)
    lens = torch.tensor([160 // 32, 17], device="cuda", dtype=torch.int32)  # 160 packed, 17 residual tokens
    want = reference(q.float(), quant.slice_tokens(kp, 0, 160), kr[..., :17, :].float(),
                     quant.slice_tokens(vp, 0, 160), vr[..., :17, :].float(), 128 ** -0.5)
    for stages in (0, 3):
        got = gluon_decode.decode_attention(q, kp, kr, vp, vr, 128 ** -0.5, lengths=lens, stages=stages)
        assert _rel(got, want) < 5e-3
    # rotated storage: packed history rotated, residual plain; the same contract as the Triton kernel
    kr_plain, vr_plain = kr, vr
    kp_rot = quant.in_channel_words(quant.quantize(quant.rotate(quant.dequantize(kp, torch.bfloat16)), 4,
                                                   "per_channel", 32))
    vp_rot = quant.quantize(quant.rotate(quant.dequantize(vp, torch.bfloat16)), 2, "per_token", 32)
    want = rotated_decode(reference, q.float(), kp_rot, kr_plain.float(), vp_rot, vr_plain.float(), 128 ** -0.5,
                          None, True, True)
    got = rotated_decode(gluon_decode.decode_attention, q, kp_rot, kr_plain, vp_rot, vr_plain, 128 ** -0.5, None,
                         True, True)
    assert _rel(got, want) < 5e-3


@gpu
@pytest.mark.parametrize("prompt,new,pairs,cuda_graph,seed,stages", [
    (90, 40, [(4, 2), (8, 4)], None, 4, 0),
    (75, 70, [(4, 2), (2, 4)], True, 5, 0),  # static buffers: key and value capacities differ, counts on the device
    (64, 40, [(4, 3), (8, 3)], True, 6, 0),
    (75, 70, [(4, 2), (8, 8)], True, 7, 3),  # the cp.async ring (2 stages for the 8-bit layer)
])
def test_cache_decodes_with_the_gluon_kernel_as_with_the_triton_one(prompt, new, pairs, cuda_graph, seed, stages):
    from kvtuner import MixedPrecisionCache
    from kvtuner.generation import greedy_generate
    from kvtuner.testing import tiny_model

    assert importlib.util.find_spec("triton.experimental.gluon")
    model = tiny_model("llama", layers=2, heads=8, kv_heads=2, head_dim=128, vocab=128).to("cuda")
    ids = torch.randint(3, 128, (2, prompt), generator=torch.Generator().manual_seed(seed)).to("cuda")
    plan = KVPlan.from_pairs(pairs, "kivi")
    runs = {}
    for decode in ("triton", "gluon"):
        cache = MixedPrecisionCache(plan, model.config, policy=KernelPolicy(decode=decode, decode_stages=stages))
        runs[decode] = greedy_generate(model, ids, cache, new, cuda_graph=cuda_graph)
        assert all(layer.layout.gluon == layer._v.token_pairs == (decode == "gluon") for layer in cache.layers)
    assert (runs["gluon"] == runs["triton"]).float().mean() >= 0.9
