"""Static-buffer decoding (the CUDA-graph path) against ordinary decoding.

On CPU the static step runs eagerly through the PyTorch reference, which checks the bookkeeping a
captured graph relies on: fixed residual slots, device-side counts, flushes between steps, the
padding mask by absolute position. On a GPU the same step is captured and replayed.
"""

from __future__ import annotations

import pytest
import torch

from kvtuner import KernelPolicy, KVPlan, MixedPrecisionCache, PlanError, with_cache
from kvtuner.generation import greedy_generate
from kvtuner.spec import LayerSpec, QuantSpec
from kvtuner.testing import tiny_model

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _model():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=32, vocab=128).to(DEV)
    model.set_attn_implementation("sdpa")
    return model


def _plan(k, v, mode="kivi", rot=False, group=8, residual=4, sink=0):
    spec = LayerSpec(QuantSpec(k, mode, group if mode == "kivi" else None, residual, rotation=rot, sink_length=sink),
                     QuantSpec(v, mode, group if mode == "kivi" else None, residual, rotation=rot, sink_length=sink))
    return KVPlan([spec, spec])


def _left_padded(seed):
    """Three 19-token prompts, rows 0 and 2 left-padded by 5 and 11 tokens: ``(ids, mask)``."""
    ids = torch.randint(3, 128, (3, 19), generator=torch.Generator().manual_seed(seed)).to(DEV)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _eager_tokens(model, plan, ids, mask, new, policy=KernelPolicy()):
    cache = MixedPrecisionCache(plan, model.config, policy=policy)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0) if mask is not None else None
    out = []
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=pos, **with_cache(model, cache)).logits[:, -1]
        out.append(logits.argmax(-1))
        full = mask
        for _ in range(new - 1):
            if full is not None:
                full = torch.cat([full, torch.ones_like(full[:, :1])], 1)
            pos = pos[:, -1:] + 1 if pos is not None else None
            logits = model(out[-1][:, None], attention_mask=full, position_ids=pos, **with_cache(model, cache)).logits
            out.append(logits[:, -1].argmax(-1))
    return torch.stack(out, 1), cache


@pytest.mark.parametrize("k,v,mode,rot,residual,sink", [(4, 2, "kivi", False, 4, 0), (8, 4, "kivi", True, 4, 0),
                                                        (4, 4, "kivi", False, 0, 0), (4, 2, "per_token", False, 0, 0),
                                                        (3, 3, "kivi", False, 12, 0), (4, 2, "kivi", True, 4, 3),
                                                        (4, 4, "per_token", False, 2, 1)])
def test_static_decode_matches_eager_cache(k, v, mode, rot, residual, sink):
    model = _model()
    plan = _plan(k, v, mode, rot, residual=residual, sink=sink)
    ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(1)).to(DEV)
    new = 30  # several flushes of 8-token units
    want, eager_cache = _eager_tokens(model, plan, ids, None, new)
    cache = MixedPrecisionCache(plan, model.config)
    got = greedy_generate(model, ids, cache, new, cuda_graph=False)
    model.config._attn_implementation = "sdpa"
    if residual == 0 and mode == "kivi":  # without a window a unit is flushed one step later
        assert (got == want).float().mean().item() >= 0.9
    else:
        assert torch.equal(got, want), (got, want)
    assert cache.is_static and cache.get_seq_length() == 21 + new - 1
    if residual:  # same storage as the ordinary cache after the same tokens
        assert [lay.token_counts() for lay in cache.layers] == [lay.token_counts() for lay in eager_cache.layers]
        assert cache.nbytes() == eager_cache.nbytes()


@pytest.mark.parametrize("k,v,mode,rot", [(3, 3, "kivi", False), (3, 4, "per_token", True), (4, 3, "kivi", True)])
def test_static_decode_with_contiguous_three_bit_codes(k, v, mode, rot):
    # words3: 3-bit keys and values as contiguous words in the static buffers too; the same tokens and
    # bytes as the eager cache in that layout, and the same tokens as the plane layout
    words = KernelPolicy(words3="on")
    model = _model()
    plan = _plan(k, v, mode, rot, residual=4)
    ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(5)).to(DEV)
    planes, _ = _eager_tokens(model, plan, ids, None, 30, KernelPolicy(words3="off"))
    want, eager_cache = _eager_tokens(model, plan, ids, None, 30, words)
    cache = MixedPrecisionCache(plan, model.config, policy=words)
    got = greedy_generate(model, ids, cache, 30, cuda_graph=False)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(got, want) and torch.equal(want, planes)
    three = [s for lay in cache.layers for s, bits in ((lay._k, k), (lay._v, v)) if bits == 3]
    assert three and all(s.channel_words and s.packed.channel_words for s in three)
    assert cache.nbytes() == eager_cache.nbytes()


@pytest.mark.parametrize("arch,kv_heads", [("qwen2", 2), ("llama", 1)])  # Qwen2 (q/k/v bias), MQA
def test_static_decode_other_models(arch, kv_heads):
    model = tiny_model(arch, layers=2, heads=4, kv_heads=kv_heads, head_dim=32, vocab=128).to(DEV)
    model.set_attn_implementation("sdpa")
    plan = _plan(4, 2)
    ids = torch.randint(3, 128, (2, 19), generator=torch.Generator().manual_seed(6)).to(DEV)
    want, _ = _eager_tokens(model, plan, ids, None, 20)
    got = greedy_generate(model, ids, MixedPrecisionCache(plan, model.config), 20, cuda_graph=False)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(got, want)


def test_static_mode_rejects_sliding_window_layers():
    model = tiny_model("gemma3", layers=2, heads=4, kv_heads=2, head_dim=32, vocab=128, sliding_window=8).to(DEV)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(7)).to(DEV)
    with pytest.raises(PlanError, match="sliding=True"):
        greedy_generate(model, ids, MixedPrecisionCache(_plan(4, 4), model.config), 4, cuda_graph=False)
    model.config._attn_implementation = "sdpa"


def test_static_decode_with_left_padding():
    model = _model()
    plan = _plan(4, 4)
    ids, mask = _left_padded(2)
    want, _ = _eager_tokens(model, plan, ids, mask, 20)
    got = greedy_generate(model, ids, MixedPrecisionCache(plan, model.config), 20, attention_mask=mask,
                          cuda_graph=False)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(got, want)
    # sink tokens are read after the packed ones, which a position-indexed static mask cannot follow
    with pytest.raises(ValueError, match="padded batch cannot be made static with sink_length"):
        greedy_generate(model, ids, MixedPrecisionCache(_plan(4, 4, sink=2), model.config), 20,
                        attention_mask=mask, cuda_graph=False)
    model.config._attn_implementation = "sdpa"


def test_static_cache_baseline_matches_dynamic():
    from transformers import StaticCache

    model = _model()
    ids = torch.randint(3, 128, (2, 17), generator=torch.Generator().manual_seed(3)).to(DEV)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[:, 17:]
    got = greedy_generate(model, ids, StaticCache(config=model.config, max_cache_len=29), 12, cuda_graph=False)
    assert torch.equal(got, want)


def test_static_mode_rejects_what_it_cannot_hold():
    model = _model()
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4)).to(DEV)
    plan = KVPlan([LayerSpec(QuantSpec(16), QuantSpec(16)), _plan(4, 4).layers[0]])
    with pytest.raises(PlanError, match="quantized keys and values"):
        greedy_generate(model, ids, MixedPrecisionCache(plan, model.config), 4, cuda_graph=False)
    cache = MixedPrecisionCache(_plan(4, 4), model.config)
    with pytest.raises(RuntimeError, match="prefilled"):
        cache.make_static(64)
    with pytest.raises(TypeError, match="cannot be captured"):
        from transformers import DynamicCache

        greedy_generate(model, ids, DynamicCache(), 4, cuda_graph=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, ids, cache, 0)
    # a full static cache says so instead of writing past its buffers
    greedy_generate(model, ids, cache, 5, cuda_graph=False)  # max_len 14: room for one more token
    cache.before_step()
    cache.after_step()
    with pytest.raises(RuntimeError, match="static cache full"):
        cache.before_step()
    model.config._attn_implementation = "sdpa"


@pytest.mark.gpu  # CUDA graphs
@pytest.mark.parametrize("k,v,rot,sink", [(4, 2, False, 0), (8, 8, False, 0), (4, 3, True, 0), (4, 2, True, 1)])
def test_gpu_graph_replay_matches_static_eager(k, v, rot, sink):
    model = tiny_model("llama", layers=2, heads=8, kv_heads=2, head_dim=64, vocab=128, dtype=torch.float16).to(DEV)
    model.set_attn_implementation("sdpa")
    plan = _plan(k, v, rot=rot, group=32, residual=8, sink=sink)
    ids = torch.randint(3, 128, (4, 70), generator=torch.Generator().manual_seed(5)).to(DEV)
    eager = greedy_generate(model, ids, MixedPrecisionCache(plan, model.config), 80, cuda_graph=False)
    graph = greedy_generate(model, ids, MixedPrecisionCache(plan, model.config), 80, cuda_graph=True)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(eager, graph)


# ---------------------------------------------------------------- generate(): model.generate's strategies
def _reference(model, plan, ids, seed, **kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, **with_cache(model, MixedPrecisionCache(plan, model.config)), **kw)


def _ours(model, plan, ids, seed, **kw):
    from kvtuner import generate

    torch.manual_seed(seed)
    return generate(model, ids, MixedPrecisionCache(plan, model.config), cuda_graph=DEV == "cuda", **kw)


@pytest.mark.parametrize("kw", [dict(do_sample=False),
                                dict(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.3),
                                dict(do_sample=True, top_k=20, min_p=0.05, no_repeat_ngram_size=3),
                                dict(do_sample=True, temperature=1.5)])
def test_generate_gives_model_generate_tokens(kw):
    # greedy and seeded sampling: the same tokens as model.generate with the same cache and seed,
    # across flushes (8-token units, 30 new tokens)
    model = _model()
    plan = _plan(4, 2)
    ids = torch.randint(3, 128, (3, 21), generator=torch.Generator().manual_seed(8)).to(DEV)
    args = dict(max_new_tokens=30, min_new_tokens=30, pad_token_id=0, **kw)
    want = _reference(model, plan, ids, 11, **args)
    model.config._attn_implementation = "sdpa"
    got = _ours(model, plan, ids, 11, **args)
    model.config._attn_implementation = "sdpa"
    assert got.shape == (3, 51) and torch.equal(got, want)
    if kw.get("do_sample"):  # the seed matters: another one draws other tokens
        other = _ours(model, plan, ids, 12, **args)
        model.config._attn_implementation = "sdpa"
        assert not torch.equal(other, want)


def test_generate_stops_rows_at_eos_and_criteria_and_streams():
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    model = _model()
    plan = _plan(4, 4)
    ids = torch.randint(3, 128, (3, 19), generator=torch.Generator().manual_seed(9)).to(DEV)
    free = _ours(model, plan, ids, 0, max_new_tokens=24, do_sample=False, pad_token_id=0)
    model.config._attn_implementation = "sdpa"
    eos = int(free[0, 19 + 5])  # row 0 ends at its 6th token (rows that never emit it run on)
    want = _reference(model, plan, ids, 0, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=1)
    model.config._attn_implementation = "sdpa"

    class Collect(BaseStreamer):
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, value):
            self.parts.append(value.reshape(value.shape[0], -1) if value.dim() > 1 else value[:, None])

        def end(self):
            self.ended = True

    streamer = Collect()
    got = _ours(model, plan, ids, 0, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=1,
                streamer=streamer)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(got, want)
    row0 = got[0, 19:].tolist()
    assert eos in row0 and set(row0[row0.index(eos) + 1:]) <= {1}  # finished row padded
    assert streamer.ended and torch.equal(torch.cat(streamer.parts, 1).to(got.device), got)

    class StopAfter(StoppingCriteria):  # a user's criterion: per row, stop once that row emitted a token
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, 19:] == self.token).any(-1)

    token = int(free[1, 19 + 3])
    crit = StoppingCriteriaList([StopAfter(token)])
    want = _reference(model, plan, ids, 0, max_new_tokens=24, do_sample=False, stopping_criteria=crit, pad_token_id=1)
    model.config._attn_implementation = "sdpa"
    got = _ours(model, plan, ids, 0, max_new_tokens=24, do_sample=False, stopping_criteria=crit, pad_token_id=1)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(got, want)


def test_generate_says_what_it_cannot_do():
    from kvtuner import generate

    model = _model()
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4)).to(DEV)
    cache = MixedPrecisionCache(_plan(4, 4), model.config)
    with pytest.raises(NotImplementedError, match="beam search.*model.generate"):
        generate(model, ids, cache, max_new_tokens=4, num_beams=2, cuda_graph=False)
    with pytest.raises(ValueError, match="unknown generation argument"):
        generate(model, ids, cache, max_new_tokens=4, top_q=0.3, cuda_graph=False)
    with pytest.raises(NotImplementedError, match="num_return_sequences"):
        generate(model, ids, cache, max_new_tokens=4, do_sample=True, num_return_sequences=2, cuda_graph=False)
    plan16 = KVPlan([LayerSpec(QuantSpec(16), QuantSpec(16)), _plan(4, 4).layers[0]])
    with pytest.raises(PlanError, match="decode this plan eagerly"):
        generate(model, ids, MixedPrecisionCache(plan16, model.config), max_new_tokens=4, cuda_graph=False)
    model.config._attn_implementation = "sdpa"


def test_generate_left_padded_batch_matches_model_generate():
    model = _model()
    plan = _plan(4, 4)
    ids, mask = _left_padded(12)
    args = dict(max_new_tokens=20, min_new_tokens=20, pad_token_id=0, do_sample=True, top_p=0.9, attention_mask=mask)
    want = _reference(model, plan, ids, 5, **args)
    model.config._attn_implementation = "sdpa"
    got = _ours(model, plan, ids, 5, **args)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(got, want)


def test_generate_stop_strings_match_model_generate():
    # stop strings need a tokenizer whose tokens decode to text: a small byte-level BPE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kvtuner.data import default_texts

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([default_texts("calibration")[:20000]], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<|end|>")
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=32, vocab=512).to(DEV)
    model.set_attn_implementation("sdpa")
    plan = _plan(4, 4)
    ids = torch.stack([tok(t, return_tensors="pt").input_ids[0, :3] for t in ("The with statement", "Class definitions")]).to(DEV)
    free = _ours(model, plan, ids, 0, max_new_tokens=24, do_sample=False, pad_token_id=0)
    model.config._attn_implementation = "sdpa"
    stop = tok.decode(free[0, ids.shape[1] + 4: ids.shape[1] + 6])  # text row 0 writes early on
    args = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, stop_strings=[stop], tokenizer=tok)
    want = _reference(model, plan, ids, 0, **args)
    model.config._attn_implementation = "sdpa"
    got = _ours(model, plan, ids, 0, **args)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(got, want)
    assert stop and stop in tok.decode(got[0, ids.shape[1]:])
    # row 0 stopped once its text ended with the stop string: padding after it (or the batch ended)
    assert (got[0, ids.shape[1] + 6:] == 0).all() and not torch.equal(got[0], free[0, :got.shape[1]]) or \
        got.shape[1] <= ids.shape[1] + 6


def test_rotated_layers_write_decode_tokens_as_plain_layers_do():
    # rotation is paid where tokens are quantized: a decode step's write into the residual window of a
    # rotated layer runs the same operations as a plain layer's and stores the token unrotated
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    model = _model()
    ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(2)).to(DEV)
    k, v = torch.randn(2, 2, 1, 32, device=DEV), torch.randn(2, 2, 1, 32, device=DEV)
    ops = {}
    for rot in (False, True):
        cache = MixedPrecisionCache(_plan(4, 2, rot=rot), model.config)
        with torch.no_grad():
            model(ids, **with_cache(model, cache))
        cache.make_static(64)
        layer = cache.layers[0]
        slot = int(layer._slot)
        with Ops() as seen:
            layer.update(k, v, 0)
        ops[rot] = seen.names
        assert layer._k.static.dtype == k.dtype and torch.equal(layer._k.static[:, :, slot], k[:, :, 0])
        assert torch.equal(layer._v.static[:, :, slot], v[:, :, 0])
        assert bool(layer._k.packed is not None and layer._k.spec.rotation == rot)
    assert ops[True] == ops[False] and any("index_copy" in name for name in ops[True])
