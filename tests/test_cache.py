"""MixedPrecisionCache on tiny random models: exactness at 16 bits, storage rules, generate(),
and the Cache API (seq length, crop, reset, beam reordering, batch ops)."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from kvtuner import KernelPolicy, KVPlan, MixedPrecisionCache, PlanError, quant, with_cache
from kvtuner.testing import tiny_model

MODELS = [("llama", 2), ("qwen2", 2), ("gemma3", 2), ("llama", 1)]  # (arch, kv heads): GQA and MQA


def _ids(batch=2, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def _decode_logits(model, cache, ids, mask, steps=32):
    """Prefill, then greedy-decode `steps` tokens one at a time; return every step's logits."""
    out = model(ids, attention_mask=mask, **with_cache(model, cache))
    logits = [out.logits]
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(nxt, attention_mask=mask, **with_cache(model, cache))
        logits.append(out.logits)
    return logits


@pytest.mark.parametrize("arch, kv_heads", MODELS, ids=lambda x: str(x))
def test_sixteen_bits_is_identical_to_dynamic_cache(arch, kv_heads):
    model = tiny_model(arch, kv_heads=kv_heads)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding in row 0
    plan = KVPlan.uniform(model.config.num_hidden_layers, 16, 16)
    ref = _decode_logits(model, DynamicCache(config=model.config), ids, mask)
    got = _decode_logits(model, MixedPrecisionCache(plan, model.config), ids, mask)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))  # prefill and all 32 decode steps; gemma3 passes its window


def test_sixteen_bit_beam_search_matches_dynamic_cache():
    model = tiny_model("qwen2")
    ids = _ids(batch=2, length=20)
    kw = dict(max_new_tokens=12, num_beams=3, do_sample=False)
    ref = model.generate(ids, **kw)
    got = model.generate(ids, **with_cache(model, MixedPrecisionCache(KVPlan.uniform(4, 16, 16), model.config)), **kw)
    assert torch.equal(ref, got)


PLANS = {
    "kivi-KV4": lambda n: KVPlan.uniform(n, 4, 4, "kivi"),
    "per_token-mixed": lambda n: KVPlan.from_pairs([(8, 4), (4, 2), (2, 2), (16, 8)][:n], "per_token", group_size=16),
    "kivi-mixed": lambda n: KVPlan.from_pairs([(8, 4), (4, 2), (2, 4), (8, 8)][:n], "kivi", group_size=8,
                                              residual_length=8),
}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("sampling", [False, True])
def test_generate_runs_with_quantized_plans(arch, plan_name, sampling):
    model = tiny_model(arch)
    ids = _ids(length=50)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    cache = MixedPrecisionCache(PLANS[plan_name](4), model.config)
    out = model.generate(ids, attention_mask=mask, **with_cache(model, cache), max_new_tokens=30, do_sample=sampling,
                         top_k=5 if sampling else None)
    assert out.shape == (2, 80)
    assert cache.get_seq_length() == 79  # the last generated token is never fed back
    full = [layer for layer in cache.layers if not layer.is_sliding]
    assert all(layer.token_counts()["key"][0] > 0 for layer in full if layer.spec.k.quantized)


def test_quantized_greedy_beam_search_runs():
    model = tiny_model("llama")
    cache = MixedPrecisionCache(PLANS["kivi-mixed"](4), model.config)
    out = model.generate(_ids(length=30), **with_cache(model, cache), max_new_tokens=20, num_beams=2, do_sample=False)
    assert out.shape == (2, 50)


# ---------------------------------------------------------------------- storage rules, driven directly
CFG = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256)


def _kv(t, batch=2, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 5, 64)  # channel outliers, as in real keys
    return [(torch.randn(batch, 2, t, 64, generator=g) * scale).to(dtype) for _ in range(2)]


STORAGE_PLANS = {
    "kivi-K4V2": KVPlan.uniform(2, 4, 2, "kivi"),
    "kivi-K8V4": KVPlan.uniform(2, 8, 4, "kivi"),
    "per_token-KV2": KVPlan.uniform(2, 2, 2, "per_token"),
    "kivi-K4V3-rotated": KVPlan.uniform(2, 4, 3, "kivi", rotation=True),
    "per_token-KV6-rotated": KVPlan.uniform(2, 6, 6, "per_token", rotation=True),
    "per_token-g32-K4V8-res16": KVPlan.uniform(2, 4, 8, "per_token", group_size=32, residual_length=16),
    "mixed": KVPlan((KVPlan.uniform(1, 8, 2, "kivi").layers[0], KVPlan.uniform(1, 16, 4, "per_token").layers[0])),
    "kivi-K4V2-sink3": KVPlan.uniform(2, 4, 2, "kivi", sink_length=3),
    "per_token-K4V4-sink2": KVPlan.uniform(2, 4, 4, "per_token", sink_length=2),
}


@pytest.mark.parametrize("name", list(STORAGE_PLANS))
def test_nbytes_equals_analytical_at_every_step(name):
    plan = STORAGE_PLANS[name]
    cache = MixedPrecisionCache(plan, CFG)
    for t in [70] + [1] * 70:  # prefill, then 70 decode steps through several flushes
        k, v = _kv(t, seed=cache.get_seq_length())
        for layer in range(2):
            cache.update(k, v, layer)
        n = cache.get_seq_length()
        assert cache.nbytes() == plan.expected_nbytes(CFG, n, batch_size=2), f"after {n} tokens"
        for layer, spec in zip(cache.layers, plan.layers):
            counts = layer.token_counts()
            assert counts["key"] == spec.k.split("key", n) and counts["value"] == spec.v.split("value", n)


def test_history_is_quantized_once_and_never_rewritten():
    cache = MixedPrecisionCache(KVPlan.uniform(2, 4, 2, "kivi"), CFG)
    k, v = _kv(100)
    cache.update(k, v, 0)
    store = cache.layers[0]._k
    first = (store.packed.codes.clone(), store.packed.scale.clone(), store.packed.zero.clone())
    assert store.num_quantized == 64
    for step in range(80):
        k1, v1 = _kv(1, seed=step + 1)
        keys, _ = cache.update(k1, v1, 0)
    assert store.num_quantized == 128  # 180 tokens: 32 + (180 - 32) % 32 = 52 stay in the residual
    assert torch.equal(store.packed.codes[..., :64, :], first[0])
    assert torch.equal(store.packed.scale[..., :2, :], first[1]) and torch.equal(store.packed.zero[..., :2, :],
                                                                                 first[2])
    assert keys.shape[-2] == 180


@pytest.mark.parametrize("mode", ["kivi", "per_token"])
@pytest.mark.parametrize("length", [64, 96, 128])
def test_group_multiple_and_one_above_are_both_quantized(mode, length):
    """Lengths G*n and G*n+1: the quantized part is exactly the documented one, no prompt token is left
    in full precision outside the residual window, and the error does not jump between the two."""
    errors = []
    for t in (length, length + 1):
        plan = KVPlan.uniform(2, 4, 4, mode)
        cache = MixedPrecisionCache(plan, CFG)
        k, v = _kv(t, seed=1)
        keys, values = cache.update(k, v, 0)
        for role, orig, got, spec in (("key", k, keys, plan.layers[0].k), ("value", v, values, plan.layers[0].v)):
            n_q, n_fp = spec.split(role, t)
            assert cache.layers[0].token_counts()[role] == (n_q, n_fp)
            assert n_fp == (spec.residual_length if mode == "per_token" else 32 + (t - 32) % 32)
            assert torch.equal(got[..., n_q:, :], orig[..., n_q:, :])  # the residual window is exact
            changed = (got[..., :n_q, :] != orig[..., :n_q, :]).any(dim=(0, 1, 3))
            assert changed.all(), "a token before the residual window was left in full precision"
            errors.append(((got[..., :n_q, :].float() - orig[..., :n_q, :].float()).norm()
                           / orig[..., :n_q, :].float().norm()).item())
    k_a, v_a, k_b, v_b = errors
    assert 0.8 < k_b / k_a < 1.25 and 0.8 < v_b / v_a < 1.25, errors


def test_crop_reset_and_batch_operations():
    plan = KVPlan.uniform(2, 4, 2, "kivi")
    cache = MixedPrecisionCache(plan, CFG)
    k, v = _kv(100)
    for layer in range(2):
        cache.update(k, v, layer)
    spec = plan.layers[0].k
    # a crop leaves the token counts and bytes of a fresh prefill of the remaining length: packed tokens
    # past that split (and the kept part of a cut key group) are dequantized back into the residual
    for crop, length in ((-10, 90), (-30, 60), (50, 50)):  # inside the residual, into a key group, keep 50
        cache.crop(crop)
        assert cache.get_seq_length() == length
        assert cache.layers[0].token_counts() == {r: spec.split(r, length) for r in ("key", "value")}
        assert cache.nbytes() == plan.expected_nbytes(CFG, length, batch_size=2, dtype_bytes=2)
    with pytest.raises(ValueError, match="at most 50"):
        cache.crop(-51)

    keys_before, _ = cache.update(*_kv(1, seed=9), 0)
    perm = torch.tensor([1, 0])
    cache.reorder_cache(perm)
    keys_after, _ = cache.update(*_kv(1, seed=10), 0)
    assert torch.equal(keys_after[:, :, :-1], keys_before[perm])

    cache.batch_repeat_interleave(3)
    assert cache.layers[0]._k.residual.shape[0] == 6
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert cache.layers[0]._k.residual.shape[0] == 2

    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    fresh = MixedPrecisionCache(plan, CFG)
    k, v = _kv(40, seed=3)
    assert torch.equal(cache.update(k, v, 0)[0], fresh.update(k, v, 0)[0])


def test_sliding_layers_stay_bounded():
    model = tiny_model("gemma3", sliding_window=16)
    plan = KVPlan.uniform(4, 4, 4, "kivi", group_size=8, residual_length=8)
    cache = MixedPrecisionCache(plan, model.config)
    model.generate(_ids(length=60), **with_cache(model, cache), max_new_tokens=60, do_sample=False)
    sliding = [layer for layer in cache.layers if layer.is_sliding]
    full = [layer for layer in cache.layers if not layer.is_sliding]
    for layer in sliding:
        stored = sum(layer.token_counts()["key"])
        assert stored <= 16 - 1 + 8, stored  # window - 1, plus at most one partial key group
        assert sum(layer.token_counts()["value"]) == stored
    assert all(sum(layer.token_counts()["key"]) == 119 for layer in full)
    with pytest.raises(RuntimeError, match="sliding-window"):
        cache.crop(-5)


# ---------------------------------------------------------------------- misuse
def test_wrong_model_is_a_clear_error():
    with pytest.raises(PlanError, match=r"plan.num_layers=30 does not match the model; allowed: 4"):
        MixedPrecisionCache(KVPlan.uniform(30, 4, 4), tiny_model("llama").config)
    small = tiny_model("llama", layers=2)
    big = tiny_model("llama", layers=4)
    cache = MixedPrecisionCache(KVPlan.uniform(2, 4, 4), small.config)
    with pytest.raises(PlanError, match="layer_idx=2 is outside this cache"):
        big(_ids(), **with_cache(big, cache))
    other = tiny_model("llama", layers=2, kv_heads=1)
    cache = MixedPrecisionCache(KVPlan.uniform(2, 4, 4), small.config)
    with pytest.raises(ValueError, match=r"does not fit this cache; allowed: \[batch, 2, tokens, 32\]"):
        other(_ids(), **with_cache(other, cache))
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0  # nothing half-stored


def test_batch_size_change_is_rejected():
    cache = MixedPrecisionCache(KVPlan.uniform(2, 4, 4), CFG)
    cache.update(*_kv(10, batch=2), 0)
    with pytest.raises(ValueError, match="batch size 3 does not match"):
        cache.update(*_kv(1, batch=3), 0)
    assert cache.get_seq_length() == 10


def test_plan_file_path_is_accepted(tmp_path):
    path = KVPlan.uniform(4, 8, 4).save(tmp_path / "p.json")
    model = tiny_model("llama")
    cache = MixedPrecisionCache.from_plan(model.config, path)
    model(_ids(), **with_cache(model, cache))
    assert cache.get_seq_length() == 40 and "MixedPrecisionCache(4 layers" in repr(cache)


@pytest.mark.parametrize("mode", ["kivi", "per_token"])
def test_rotated_storage_returns_unrotated_tensors_with_less_error(mode):
    k, v = _kv(96, dtype=torch.float32)
    k[..., 5] *= 20  # one outlier channel
    errs = {}
    for rot in (False, True):
        cache = MixedPrecisionCache(KVPlan.uniform(2, 3, 3, mode, rotation=rot), CFG)
        keys, values = cache.update(k, v, 0)
        store = cache.layers[0]._k
        n = store.num_quantized
        assert n and torch.equal(store.residual, k[..., n:, :])  # the full-precision window stays plain
        packed = quant.dequantize(store.packed, torch.float32)  # the history is quantized rotated
        assert (((packed - k[..., :n, :] @ quant.hadamard(64)).norm() < (packed - k[..., :n, :]).norm()) == rot)
        errs[rot] = ((keys - k).norm() / k.norm()).item(), ((values - v).norm() / v.norm()).item()
    # per-token groups suffer from channel outliers and rotation spreads them; KIVI keys already have a
    # scale per channel, so only their values (per token) gain
    if mode == "per_token":
        assert errs[True][0] < 0.8 * errs[False][0], errs
    assert errs[True][1] < errs[False][1], errs


def test_rotation_needs_power_of_two_head_dim():
    cfg = LlamaConfig(hidden_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=48, num_hidden_layers=1)
    with pytest.raises(PlanError, match="power-of-two head_dim"):
        MixedPrecisionCache(KVPlan.uniform(1, 4, 4, rotation=True), cfg)
    MixedPrecisionCache(KVPlan.uniform(1, 4, 4), cfg)  # without rotation any head_dim works


@pytest.mark.parametrize("vbits,blocked", [(2, True), (3, True), (4, True), (8, False)])
def test_values_in_token_blocks_hold_the_same_cache(vbits, blocked):
    # on the GPU, KIVI values of 2-4 bits are kept in token blocks for the fused kernel (and 4-bit keys
    # beside them in channel word order); forced here on the CPU: same tensors out, same bytes, same
    # crop semantics (cuts fall on whole blocks)
    plan = KVPlan.uniform(2, 4, vbits, "kivi")
    k, v = _kv(100)
    runs = {}
    for flag in (False, True):
        cache = MixedPrecisionCache(plan, CFG, policy=KernelPolicy(value_token_blocks="on" if flag else "off"))
        outs = [cache.update(k, v, layer) for layer in range(2)]
        outs += [cache.update(*_kv(1, seed=s), 0) for s in range(40)]  # two more flushes in layer 0
        runs[flag] = (cache, outs)
    (plain, outs_p), (tb, outs_b) = runs[False], runs[True]
    assert tb.layers[0]._v.token_block == (32 if blocked else 0) and tb.layers[0]._k.token_block == 0
    assert tb.layers[0]._k.channel_words == blocked and tb.layers[0]._k.packed.channel_words == blocked  # 4-bit keys
    assert not plain.layers[0]._k.channel_words
    assert plain.layers[0]._v.token_block == 0
    assert tb.layers[0]._v.packed.token_block == tb.layers[0]._v.token_block
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(outs_p, outs_b))
    assert tb.nbytes() == plain.nbytes()
    for cache in (plain, tb):
        cache.crop(-60)  # cuts into a key group and, when blocked, into a value block
    fresh = {r: plan.layers[0].k.split(r, 80) for r in ("key", "value")}  # a fresh 80-token prefill: (32, 48)
    assert tb.layers[0].token_counts() == plain.layers[0].token_counts() == fresh
    for layer in range(2):  # the cut block's kept tokens now sit in the bf16 residual: bf16 rounding only
        a, b = plain.layers[layer], tb.layers[layer]
        torch.testing.assert_close(b._v.materialize(torch.float32), a._v.materialize(torch.float32), rtol=4e-3,
                                   atol=1e-6)
    more = _kv(40, seed=77)  # the cut block's tokens are quantized again on the next flush
    a, b = plain.update(*more, 0), tb.update(*more, 0)
    assert (a[1].float() - b[1].float()).abs().max() < 0.05 * b[1].float().abs().max()


@pytest.mark.parametrize("mode", ["kivi", "per_token"])
def test_sink_tokens_stay_exact_and_groups_start_after_them(mode):
    from kvtuner.cache import simulate_cache
    from kvtuner.spec import QuantSpec

    plan = KVPlan.uniform(2, 2, 2, mode, sink_length=3)
    cache = MixedPrecisionCache(plan, CFG)
    k, v = _kv(100, seed=4)
    for t0, t1 in [(0, 2), (2, 70)] + [(t, t + 1) for t in range(70, 100)]:  # the sink fills over two updates
        keys, values = cache.update(k[..., t0:t1, :], v[..., t0:t1, :], 0)
    spec = plan.layers[0].k
    n_q, n_fp = spec.split("key", 100)
    assert n_q > 0 and cache.layers[0].token_counts()["key"] == (n_q, n_fp)
    for orig, got, role in ((k, keys, "key"), (v, values, "value")):
        assert torch.equal(got[..., :3, :], orig[..., :3, :])  # the sink, in full precision
        assert torch.equal(got[..., 3 + n_q:, :], orig[..., 3 + n_q:, :])  # the residual window
        assert (got[..., 3:3 + n_q, :] != orig[..., 3:3 + n_q, :]).any(dim=(0, 1, 3)).all()
        # quantized groups start at token 3: the same as quantizing tokens 3.. on their own
        alone = simulate_cache(orig[..., 3:, :], QuantSpec(2, mode), role)
        assert torch.equal(got[..., 3:3 + n_q, :], alone[..., :n_q, :])
        assert torch.equal(got, simulate_cache(orig, spec, role))  # profiling sees what the cache stores
    if mode != "kivi":
        return
    # per-channel key groups: an outlying first token (attention sinks are) no longer widens its group
    k2 = k.clone()
    k2[..., 0, :] *= 20
    err = {}
    for sink in (0, 3):
        got = simulate_cache(k2, QuantSpec(2, mode, sink_length=sink), "key")
        err[sink] = ((got - k2)[..., 3:, :].norm() / k2[..., 3:, :].norm()).item()
    assert err[3] < 0.5 * err[0], err


def test_crop_through_sink_and_packed_tokens_keeps_the_prefix():
    plan = KVPlan.uniform(2, 4, 2, "kivi", sink_length=5)
    cache = MixedPrecisionCache(plan, CFG)
    k, v = _kv(120, seed=5)
    full_k, full_v = cache.update(k, v, 0)
    assert cache.layers[0].token_counts()["key"] == (64, 56)
    for keep in (100, 90, 60, 5, 3, 1):  # inside the window, into packed groups, into the sink
        cache.crop(keep)
        assert cache.layers[0].cumulative_length == keep
        got_k = cache.layers[0]._k.materialize(full_k.dtype)
        got_v = cache.layers[0]._v.materialize(full_v.dtype)
        assert torch.equal(got_k, full_k[..., :keep, :]) and torch.equal(got_v, full_v[..., :keep, :])
    cache.update(*_kv(80, seed=6), 0)  # refills the sink, then quantizes after it again
    spec = plan.layers[0].k
    assert cache.layers[0].token_counts()["key"] == spec.split("key", 81) == (32, 49)
    assert cache.layers[0].nbytes() == sum(2 * 2 * (s.quantized_bytes(r, s.split(r, 81)[0], 64)
                                                     + s.split(r, 81)[1] * 64 * 2)
                                           for s, r in ((spec, "key"), (plan.layers[0].v, "value")))


def test_sink_length_must_match_between_keys_and_values_and_skips_sliding_layers():
    from kvtuner.spec import LayerSpec, QuantSpec

    bad = KVPlan([LayerSpec(QuantSpec(4, sink_length=2), QuantSpec(4, sink_length=0))] * 2)
    with pytest.raises(PlanError, match="sink_length"):
        MixedPrecisionCache(bad, CFG)
    model = tiny_model("gemma3", sliding_window=16)
    cache = MixedPrecisionCache(KVPlan.uniform(4, 4, 4, "kivi", group_size=8, residual_length=8, sink_length=2),
                                model.config)
    sinks = {layer.is_sliding: layer._k.sink for layer in cache.layers}
    assert sinks == {True: 0, False: 2}


def test_three_bit_words_by_default_on_the_fused_path_only():
    # words3="auto": 3-bit codes packed along head_dim as contiguous words wherever the fused kernel reads
    # the cache (timed faster on the GPU), bit planes on the reference path; token-blocked values keep theirs
    from kvtuner.spec import QuantSpec

    # the fused path: a GPU, or on a CPU-only machine Triton's interpreter (tests/conftest.py)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g32, g128, v4 = QuantSpec(3, "kivi", 32), QuantSpec(3, "kivi", 128), QuantSpec(4, "kivi", 32)
    layouts = {}
    for backend in ("torch", "triton"):
        policy = KernelPolicy(backend)
        lay = [policy.layout(s, s, d, dev) for s, d in ((g32, 64), (g128, 64), (g32, 12), (v4, 64))]
        layouts[backend] = [lay[0].key_words, lay[0].value_words, lay[1].key_words, lay[1].value_words,
                            lay[2].value_words, lay[3].key_words]  # head_dim 12: words need head_dim % 8
    assert layouts["torch"] == [False] * 6
    # G = 128 values go in token blocks on the fused path, so only their keys are words; 4-bit keys beside
    # values packed along head_dim keep the plain order
    assert layouts["triton"] == [True, True, True, False, False, False]
    with pytest.raises(ValueError, match="words3='yes' is invalid; allowed: auto, on, off"):
        KernelPolicy(words3="yes")
    with pytest.raises(ValueError, match="backend='cuda' is invalid"):
        KernelPolicy("cuda")


@pytest.mark.parametrize("mode,group", [("kivi", 32), ("per_token", 32)])
def test_contiguous_three_bit_codes_hold_the_same_cache(mode, group):
    # words3: 3-bit keys and values stored as contiguous 24-bit words (quant.to_channel_words); forced
    # here on the CPU, where the reference path reads them back: same tensors out, same bytes
    plan = KVPlan.uniform(2, 3, 3, mode, group_size=group)
    runs = {}
    for flag in (False, True):
        cache = MixedPrecisionCache(plan, CFG, policy=KernelPolicy(words3="on" if flag else "off"))
        outs = [cache.update(*_kv(100), layer) for layer in range(2)]
        outs += [cache.update(*_kv(1, seed=s), 0) for s in range(40)]
        runs[flag] = (cache, outs)
    (plain, outs_p), (worded, outs_w) = runs[False], runs[True]
    for store in ("_k", "_v"):
        w, p = getattr(worded.layers[0], store), getattr(plain.layers[0], store)
        assert w.channel_words and w.packed.channel_words and not p.channel_words
        assert not torch.equal(w.packed.codes, p.packed.codes)  # really re-laid
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(outs_p, outs_w))
    assert worded.nbytes() == plain.nbytes()
    blocks = KernelPolicy(value_token_blocks="on", words3="on")  # values in token blocks keep their own layout
    blocked = MixedPrecisionCache(KVPlan.uniform(2, 3, 3, "kivi", group_size=32), CFG, policy=blocks)
    blocked.update(*_kv(100), 0)
    assert blocked.layers[0]._k.channel_words and blocked.layers[0]._v.token_block == 32
    assert not blocked.layers[0]._v.channel_words


@pytest.mark.parametrize("plan", [KVPlan.uniform(4, 4, 4, "kivi", group_size=8, residual_length=8),
                                  KVPlan.uniform(4, 4, 2, "per_token"), KVPlan.uniform(4, 16, 16),
                                  KVPlan.uniform(4, 4, 4, "kivi", group_size=8, residual_length=8, sink_length=2)],
                         ids=["kivi", "per_token", "16bit", "kivi-sink"])
def test_expected_nbytes_counts_sliding_layers_at_their_window(plan):
    # a Gemma-3-style model: sliding layers hold their window (oldest tokens dropped in whole key groups,
    # no sink), whether the tokens came in one prefill or one by one
    model = tiny_model("gemma3", sliding_window=16)
    ids = torch.randint(3, 100, (1, 70), generator=torch.Generator().manual_seed(2))
    for length in (5, 16, 17, 30, 70):
        prefill, stepped = MixedPrecisionCache(plan, model.config), MixedPrecisionCache(plan, model.config)
        with torch.no_grad():
            model(ids[:, :length], **with_cache(model, prefill))
            model(ids[:, :3], **with_cache(model, stepped))
            for t in range(3, length):
                model(ids[:, t:t + 1], **with_cache(model, stepped))
        want = plan.expected_nbytes(model.config, length, dtype_bytes=4)
        assert prefill.nbytes() == stepped.nbytes() == want, length


@pytest.mark.parametrize("bits", [16, 4])
def test_assisted_decoding_on_sliding_window_models(bits):
    # prompt-lookup decoding crops the cache after each draft: sliding layers defer eviction meanwhile
    from transformers import DynamicCache

    model = tiny_model("gemma3", sliding_window=16, vocab=128)
    ids = torch.randint(3, 30, (1, 40), generator=torch.Generator().manual_seed(3))
    ids[0, 20:30] = ids[0, 5:15]  # repeats, so that prompt lookup proposes drafts
    plan = KVPlan.uniform(4, bits, bits, "kivi", group_size=8, residual_length=8)
    kw = dict(max_new_tokens=30, do_sample=False)
    plain = model.generate(ids, **with_cache(model, MixedPrecisionCache(plan, model.config)), **kw)
    assisted = model.generate(ids, **with_cache(model, MixedPrecisionCache(plan, model.config)), **kw,
                              prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, plain)
    if bits == 16:
        assert torch.equal(assisted, model.generate(ids, **with_cache(model, DynamicCache(config=model.config)), **kw))


def test_crop_of_a_kivi_cache_holds_what_a_fresh_cache_of_that_length_holds():
    model = tiny_model("llama", layers=2)
    plan = KVPlan.uniform(2, 4, 4, "kivi")
    ids = torch.randint(3, 100, (1, 100), generator=torch.Generator().manual_seed(4))
    cropped, fresh = MixedPrecisionCache(plan, model.config), MixedPrecisionCache(plan, model.config)
    with torch.no_grad():
        model(ids, **with_cache(model, cropped))
        cropped.crop(70)
        model(ids[:, :70], **with_cache(model, fresh))
        assert [lay.token_counts() for lay in cropped.layers] == [lay.token_counts() for lay in fresh.layers]
        assert cropped.layers[0].token_counts()["key"] == (32, 38) and cropped.nbytes() == fresh.nbytes()
        a = model(ids[:, 70:71], **with_cache(model, cropped)).logits
        b = model(ids[:, 70:71], **with_cache(model, fresh)).logits
    # the 32 tokens that had been quantized keep their quantized values: close, not identical
    assert 0 < (a - b).abs().max() < 0.05 * b.abs().max()


def test_values_in_token_pairs_hold_the_same_storage():
    # Gluon layers keep values in token pairs (LayerLayout.value_pairs): same tensors out and bytes as plain
    # rows, flushes and crops included
    from kvtuner.policy import LayerLayout
    from kvtuner.store import TensorStore

    spec = KVPlan.uniform(1, 4, 2, "kivi").layers[0].v
    stores = []
    for pairs in (False, True):
        store = TensorStore(spec, "value", 64)
        store.set_layout(LayerLayout(value_pairs=pairs))
        store.append(_kv(100)[1])
        for s in range(40):
            store.append(_kv(1, seed=s)[1])
        stores.append(store)
    plain, paired = stores
    assert paired.packed.token_pairs and not plain.packed.token_pairs and paired.num_quantized == 96
    assert not torch.equal(paired.packed.codes, plain.packed.codes)
    assert torch.equal(paired.materialize(torch.float32), plain.materialize(torch.float32))
    assert paired.nbytes() == plain.nbytes()
