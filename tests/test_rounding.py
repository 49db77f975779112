"""Query-aware key rounding: the reference, its Triton kernel, its place in plans, the cache and profiling."""

from __future__ import annotations

import json

import pytest
import torch

from kvtuner import KVPlan, quant
from kvtuner.cache import MixedPrecisionCache, simulate_cache
from kvtuner.rounding import KeyRounding, quantize_keys, query_moments
from kvtuner.spec import PlanError, QuantSpec
from kvtuner.testing import tiny_model


def _anisotropic(heads: int, d: int, seed: int = 0) -> torch.Tensor:
    """Second moments with a steeply falling spectrum, as real queries have."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(heads, d, d, generator=g))
    spectrum = torch.logspace(0, -3, d)
    return q @ torch.diag_embed(spectrum.expand(heads, d)) @ q.transpose(-1, -2)


def _weighted_error(x: torch.Tensor, xq: torch.Tensor, moments: torch.Tensor) -> float:
    e = (xq - x).double()
    return torch.einsum("bhtd,hde,bhte->", e, moments.double(), e).item()


@pytest.mark.parametrize("granularity,group", [("per_channel", 32), ("per_token", 16)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_isotropic_queries_give_nearest_rounding(granularity, group, bits):
    # with H = I no channel's error is worth passing on: the codes are quant.quantize's, bit for bit
    x = torch.randn(2, 3, 64, 32)
    factor = KeyRounding(torch.eye(32).expand(1, 3, 32, 32).clone()).factor(0, rotated=False)
    ref = quant.quantize(x, bits, granularity, group)
    got = quantize_keys(x, bits, granularity, group, factor)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_query_aware_codes_cut_the_error_queries_see(bits):
    torch.manual_seed(1)
    heads, d = 3, 32
    moments = _anisotropic(heads, d)
    x = torch.randn(2, heads, 96, d)
    factor = KeyRounding(moments[None]).factor(0, rotated=False)
    nearest = quant.quantize(x, bits, "per_channel", 32)
    aware = quantize_keys(x, bits, "per_channel", 32, factor)
    # the same grid: only the codes move
    assert torch.equal(aware.scale, nearest.scale) and torch.equal(aware.zero, nearest.zero)
    codes = quant.unpack(aware.codes, bits, d)
    assert codes.max() <= 2 ** bits - 1
    ratio = _weighted_error(x, quant.dequantize(aware, torch.float32), moments) / _weighted_error(
        x, quant.dequantize(nearest, torch.float32), moments)
    assert ratio < 0.75, ratio


def test_rotated_factor_is_the_moments_in_the_rotated_basis():
    moments = _anisotropic(2, 16)
    kr = KeyRounding(moments[None])
    r = quant.hadamard(16, dtype=torch.float64)
    rotated = KeyRounding((r.T @ moments.double() @ r).float()[None]).factor(0, rotated=False)
    assert torch.allclose(kr.factor(0, rotated=True), rotated, rtol=1e-4, atol=1e-5)
    u = kr.factor(0, rotated=False).double()
    h = moments.double() + kr.damping * moments.double().diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(16)
    assert torch.allclose(u.transpose(-1, -2) @ u @ h, torch.eye(16, dtype=torch.float64).expand(2, 16, 16),
                          atol=1e-4)


def test_plan_file_carries_the_moments(tmp_path):
    moments = _anisotropic(2, 32).expand(3, 2, 32, 32).clone() * 7.5
    plan = KVPlan.uniform(3, 3, 3, "kivi").with_key_rounding(KeyRounding(moments))
    path = plan.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["_version"] == 2 and data["key_rounding"]["shape"] == [3, 2, 32, 32]
    back = KVPlan.load(path)
    assert torch.allclose(back.key_rounding.moments, moments, rtol=2e-3, atol=1e-6 * moments.abs().max().item())
    assert back == plan  # the layers; the moments do not take part in equality
    plain = KVPlan.uniform(3, 3, 3, "kivi").save(tmp_path / "q.json")
    assert json.loads(plain.read_text())["_version"] == 1 and KVPlan.load(plain).key_rounding is None


def test_bad_moments_in_a_plan_file_are_named():
    good = KVPlan.uniform(2, 3, 3).with_key_rounding(KeyRounding(torch.eye(8).expand(2, 1, 8, 8).clone())).to_dict()
    bad = json.loads(json.dumps(good))
    bad["key_rounding"]["upper_fp16"] = bad["key_rounding"]["upper_fp16"][:-8]
    with pytest.raises(PlanError, match="key_rounding"):
        KVPlan.from_dict(bad)
    bad = json.loads(json.dumps(good))
    bad["key_rounding"]["kind"] = "other"
    with pytest.raises(PlanError, match="query_second_moments"):
        KVPlan.from_dict(bad)
    with pytest.raises(PlanError, match="layers"):
        KVPlan.uniform(3, 3, 3).with_key_rounding(KeyRounding(torch.eye(8).expand(2, 1, 8, 8).clone()))
    with pytest.raises(ValueError, match="non-finite"):
        KeyRounding(torch.full((1, 1, 4, 4), float("nan")))


def test_moments_must_fit_the_model():
    model = tiny_model("llama", layers=2, kv_heads=2, head_dim=32)
    plan = KVPlan.uniform(2, 3, 3).with_key_rounding(KeyRounding(torch.eye(16).expand(2, 2, 16, 16).clone()))
    with pytest.raises(PlanError, match="head_dim 16"):
        MixedPrecisionCache(plan, model.config)


def test_cache_stores_the_codes_profiling_simulates():
    # the cache and simulate_cache (what profiling measures) apply the same query-aware codes
    model = tiny_model("llama", layers=2, kv_heads=2, head_dim=32)
    ids = torch.randint(3, 100, (1, 160))
    with torch.no_grad():
        kr = query_moments(model, [ids])
    assert kr.moments.shape == (2, 2, 32, 32)
    assert torch.allclose(kr.moments, kr.moments.transpose(-1, -2)) and (kr.moments.diagonal(dim1=-2, dim2=-1) > 0).all()
    spec = QuantSpec(3, "kivi", rotation=True, sink_length=1)
    plan = KVPlan.uniform(2, 3, 3, "kivi", rotation=True, sink_length=1).with_key_rounding(kr)
    cache = MixedPrecisionCache(plan, model.config)
    keys = torch.randn(1, 2, 160, 32)
    cache.update(keys, torch.randn(1, 2, 160, 32), 1)
    stored = cache.layers[1]._k.materialize(torch.float32)
    assert torch.equal(stored, simulate_cache(keys, spec, "key", rounding=(kr, 1)))
    assert not torch.equal(stored, simulate_cache(keys, spec, "key"))  # nearest rounding differs


@pytest.mark.parametrize("d,bits,granularity,group,t,dtype", [
    (32, 3, "per_channel", 16, 48, torch.float32), (64, 2, "per_channel", 32, 64, torch.bfloat16),
    (128, 4, "per_channel", 32, 32, torch.float16), (64, 6, "per_channel", 16, 32, torch.float16),
    (32, 8, "per_channel", 16, 16, torch.float32), (64, 3, "per_token", 32, 21, torch.float16),
    (16, 4, "per_token", None, 40, torch.float32)])
def test_triton_kernel_matches_the_reference(d, bits, granularity, group, t, dtype):
    # one launch quantizes, rounds and packs: same scales and zeros as quant.quantize, codes as the reference
    pytest.importorskip("triton")
    from kvtuner.kernels.rounding import fused_supported
    from kvtuner.kernels.rounding import quantize_keys as fused

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on a CPU
    torch.manual_seed(2)
    x = (torch.randn(2, 2, t, d) * torch.linspace(0.2, 3, d)).to(dtype)
    factor = KeyRounding(_anisotropic(2, d)[None]).factor(0, rotated=False)
    assert fused_supported(x, bits, granularity, group)
    ref = quantize_keys(x, bits, granularity, group, factor)
    got = fused(x.to(device), bits, granularity, group, factor.to(device))
    assert got.codes.shape == ref.codes.shape and (got.group_size, got.granularity) == (ref.group_size, granularity)
    assert torch.equal(got.scale.cpu(), ref.scale) and torch.equal(got.zero.cpu(), ref.zero)
    diff = (quant.unpack(got.codes.cpu(), bits, d).int() - quant.unpack(ref.codes, bits, d).int()).abs()
    if device == "cpu":  # the interpreter rounds every operation as the reference does: the same codes
        assert diff.max() == 0, (diff > 0).float().mean()
    # on a GPU a fused multiply-add may tip a value across a rounding tie; the error it passes on then
    # follows, so a few later codes move by one
    assert diff.float().mean() < 0.01 and (diff > 0).float().mean() < 0.02, (diff.float().mean(), diff.max())


def test_triton_path_falls_back_where_the_kernel_does_not_reach():
    # a tail group the kernel does not take: quantize_keys(triton=True) gives the reference's result
    x = torch.randn(1, 2, 40, 32)
    factor = KeyRounding(_anisotropic(2, 32)[None]).factor(0, rotated=False)
    from kvtuner.kernels.rounding import fused_supported

    assert not fused_supported(x, 3, "per_channel", 32)
    a = quantize_keys(x, 3, "per_channel", 32, factor, triton=True)
    b = quantize_keys(x, 3, "per_channel", 32, factor)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


@pytest.mark.gpu
def test_cache_on_the_gpu_rounds_as_on_the_cpu():
    # on CUDA the store rounds with the Triton kernel and lays codes out for the fused decode kernel;
    # what attention reads back matches the CPU reference (up to rounding ties)
    torch.manual_seed(3)
    model = tiny_model("llama", layers=2, kv_heads=2, head_dim=64)
    kr = KeyRounding(_anisotropic(2, 64).expand(2, 2, 64, 64).clone())
    plan = KVPlan.uniform(2, 3, 3, "kivi", rotation=True, sink_length=1).with_key_rounding(kr)
    keys, values = torch.randn(2, 2, 200, 64), torch.randn(2, 2, 200, 64)
    got = {}
    for dev in ("cpu", "cuda"):
        cache = MixedPrecisionCache(plan, model.config)
        cache.update(keys.to(dev), values.to(dev), 0)
        got[dev] = cache.layers[0]._k.materialize(torch.float32).cpu()
    assert cache.layers[0]._k.triton
    differ = ~torch.isclose(got["cpu"], got["cuda"], rtol=1e-3, atol=1e-3)
    assert differ.float().mean() < 0.02, differ.float().mean()
