"""The real SmolLM2-135M-Instruct (30 layers, 3 KV heads, head_dim 64), loaded once per test run.

Run only these: `python -m pytest tests/integration -m slow`.
"""

import pytest
import torch
from transformers import DynamicCache

from kvtuner import KVPlan, MixedPrecisionCache, perplexity
from kvtuner.data import default_texts, token_ids

pytestmark = pytest.mark.slow


def test_default_text_splits_are_disjoint_and_deterministic():
    calib, held_out = default_texts("calibration"), default_texts("evaluation")
    assert calib == default_texts("calibration") and len(held_out) > 50_000 and len(calib) > 3 * len(held_out)
    from pydoc_data.topics import topics

    in_eval = {k for k, text in topics.items() if text in held_out}
    assert in_eval and not any(topics[k] in calib for k in in_eval)


def test_kv8_perplexity_within_half_percent(smollm2):
    model, tok = smollm2
    ids = token_ids(tok, default_texts("evaluation"), 1024)
    full = perplexity(model, ids, None, prefill=256, chunk_size=16)
    for mode in ("kivi", "per_token"):
        ppl = perplexity(model, ids, KVPlan.uniform(30, 8, 8, mode), prefill=256, chunk_size=16)
        print(f"{mode} KV8 ppl {ppl:.4f} vs full {full:.4f} ({100 * (ppl / full - 1):+.3f} %)")
        assert abs(ppl / full - 1) < 0.005
    ppl2 = perplexity(model, ids, KVPlan.uniform(30, 2, 2, "per_token"), prefill=256, chunk_size=16)
    assert ppl2 > 1.5 * full  # the cache really quantizes: per-token KV2 is known to break this model


@pytest.mark.parametrize("plan", [
    KVPlan.uniform(30, 4, 4, "kivi"),
    KVPlan.from_pairs([(8, 4) if i in (0, 1, 29) else (4, 2) if i % 2 else (4, 4) for i in range(30)], "kivi"),
], ids=["kivi-KV4", "kivi-mixed"])
def test_greedy_generate_with_quantized_plans(smollm2, plan):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "List three uses of Python's with statement."}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    cache = MixedPrecisionCache(plan, model.config)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=48, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    text = tok.decode(out[0, n_prompt:], skip_special_tokens=True)
    same = (out[0, n_prompt:] == ref[0, n_prompt:]).float().mean().item()
    print(f"{plan.equivalent_bits:.2f} bits, {same:.0%} of tokens equal to full precision: {text!r}")
    assert len(text.split()) > 5
    assert cache.get_seq_length() == out.shape[1] - 1
    assert all(layer.token_counts()["key"][0] > 0 for layer in cache.layers)  # quantized history in every layer
    assert cache.nbytes() == plan.expected_nbytes(model.config, cache.get_seq_length(), dtype_bytes=4)


@pytest.fixture(scope="module")
def smollm2_kv(smollm2):
    """Real SmolLM2 keys/values for 2048 held-out tokens, in bf16, per layer."""
    model, tok = smollm2
    ids = token_ids(tok, default_texts("evaluation"), 2048)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return [(layer.keys.to(torch.bfloat16), layer.values.to(torch.bfloat16)) for layer in cache.layers]


@pytest.mark.parametrize("mode", ["per_token", "kivi"])
@pytest.mark.parametrize("pair", [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2)], ids=lambda p: f"K{p[0]}V{p[1]}")
def test_memory_ratio_matches_analytical_at_2048_tokens(smollm2, smollm2_kv, mode, pair):
    """nbytes() / bf16 DynamicCache bytes vs. the analytical ratio (codes + metadata + residual).

    The real model's K/V (bf16) go through the cache as a 2000-token prefill plus 48 decode steps.
    `benchmarks/bench_memory.py` does the same with full bf16 forward passes.
    """
    model, _ = smollm2
    plan = KVPlan.uniform(30, *pair, mode)
    cache = MixedPrecisionCache(plan, model.config)
    for i, (k, v) in enumerate(smollm2_kv):
        cache.update(k[..., :2000, :], v[..., :2000, :], i)
    for t in range(2000, 2048):
        for i, (k, v) in enumerate(smollm2_kv):
            cache.update(k[..., t:t + 1, :], v[..., t:t + 1, :], i)
    bf16_bytes = sum(k.numel() * 2 + v.numel() * 2 for k, v in smollm2_kv)
    measured = cache.nbytes() / bf16_bytes
    analytical = plan.expected_nbytes(model.config, 2048) / bf16_bytes
    assert abs(measured / analytical - 1) < 0.05
    assert cache.nbytes() <= plan.expected_nbytes(model.config, 2048)
    assert measured < plan.equivalent_bits / 16 + 0.08  # metadata + residual overhead stays small
