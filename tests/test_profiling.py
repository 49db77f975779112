"""Profiling and evaluation on tiny models: determinism, monotone errors, hook cleanup, the table
artefact and its validation, and the evaluation report."""

import json
import math
import types

import pytest
import torch

from kvtuner import KVPlan, LayerSpec, PlanError
from kvtuner.evaluation import Evaluator
from kvtuner.profiling import SensitivityTable, capture_attention, profile, spearman
from kvtuner.testing import tiny_model


class CharTokenizer:
    """A stand-in tokenizer: one token per character (ids 3..122)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return types.SimpleNamespace(input_ids=torch.tensor([[3 + (ord(c) % 120) for c in text]]))

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 40


@pytest.fixture(scope="module")
def table():
    model = tiny_model("llama", layers=3)
    return profile(model, CharTokenizer(), TEXT, num_sequences=2, seq_len=128, progress=False), model


def test_errors_grow_as_bits_fall_and_vanish_at_16(table):
    tab, model = table
    for mode in tab.modes:
        for layer in range(3):
            kv = [tab.error(mode, layer, (b, b)) for b in (8, 4, 2)]
            assert 0 < kv[0] < kv[1] < kv[2]
            assert tab.key_error[mode][layer][0] < tab.key_error[mode][layer][2]
            assert tab.value_error[mode][layer][0] < tab.value_error[mode][layer][2]
    t16 = profile(model, CharTokenizer(), TEXT, pairs=[(16, 16), (16, 2)], modes=["kivi"], num_sequences=1,
                  seq_len=128, progress=False)
    assert t16.output_error["kivi"][0][0] == 0.0 and t16.output_error["kivi"][0][1] > 0


def test_profiling_is_deterministic(table):
    tab, model = table
    again = profile(model, CharTokenizer(), TEXT, num_sequences=2, seq_len=128, progress=False)
    assert again.to_dict() == tab.to_dict()


def test_capture_restores_attention_even_after_an_error():
    model = tiny_model("gemma3", layers=2)
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(model) as records:
            model(torch.randint(3, 100, (1, 20)))
            assert set(records) == {0, 1} and records[0]["sliding_window"] == 16
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    model(torch.randint(3, 100, (1, 20)))  # still runs normally


def test_table_round_trip_and_validation(table, tmp_path):
    tab, model = table
    path = tab.save(tmp_path / "t.kvtable.json")
    again = SensitivityTable.load(path, config=model.config)
    assert again.to_dict() == tab.to_dict()
    with pytest.raises(PlanError, match="table.model.num_layers=3 does not match the model; allowed: 4"):
        SensitivityTable.load(path, config=tiny_model("llama", layers=4).config)
    data = json.loads(path.read_text())
    data["output_error"]["kivi"][1] = [0.1] * 3
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"table.output_error.kivi\[1\]"):
        SensitivityTable.load(tmp_path / "bad.json")


def test_bad_profiling_input_is_clear():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="calibration text is empty"):
        profile(model, CharTokenizer(), "  ", progress=False)
    with pytest.raises(ValueError, match="has 5 tokens; allowed: at least seq_len=128"):
        profile(model, CharTokenizer(), "short", seq_len=128, progress=False)
    with pytest.raises(ValueError, match="leaves nothing quantized"):
        profile(model, CharTokenizer(), TEXT, seq_len=40, progress=False)
    with pytest.raises(PlanError, match="bits=5"):
        profile(model, CharTokenizer(), TEXT, pairs=[(5, 4)], progress=False)


def test_layer_kl_is_recorded():
    model = tiny_model("llama", layers=2)
    tab = profile(model, CharTokenizer(), TEXT, modes=["kivi"], pairs=[(2, 2)], num_sequences=1, seq_len=128,
                  kl_pairs=[(2, 16), (16, 2)], progress=False)
    assert set(tab.kl["kivi"]) == {"K2V16", "K16V2"} and len(tab.kl["kivi"]["K2V16"]) == 2
    assert all(x >= 0 for x in tab.kl["kivi"]["K2V16"])


def test_rotated_three_bit_profile_searches_to_rotated_plans(tmp_path):
    from kvtuner.search import search

    model = tiny_model("llama", layers=2)
    pairs = [(4, 4), (4, 3), (3, 3), (3, 2), (2, 2)]
    tab = profile(model, CharTokenizer(), TEXT, modes=["kivi"], pairs=pairs, num_sequences=1, seq_len=128,
                  kl_pairs=pairs, rotation=True, progress=False)
    assert tab.rotation and 3 in tab.bits and set(tab.kl["kivi"]) == {"KV4", "K4V3", "KV3", "K3V2", "KV2"}
    again = SensitivityTable.load(tab.save(tmp_path / "t.json"))
    assert again.rotation and again.pairs == tab.pairs
    plain = profile(model, CharTokenizer(), TEXT, modes=["kivi"], pairs=pairs, num_sequences=1, seq_len=128,
                    progress=False)
    assert plain.output_error != tab.output_error  # rotation changes what is measured
    front = search(again, mode="kivi", progress=False, cluster=False)
    plan = front.best(3.5)
    assert plan.equivalent_bits <= 3.5 and all(layer.k.rotation and layer.v.rotation for layer in plan.layers)
    assert any(3 in pair for p in front.points for pair in p.plan.pairs)  # 3-bit steps are on the frontier


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_evaluator_report():
    model = tiny_model("llama", layers=2)
    ev = Evaluator(model, CharTokenizer(), TEXT, windows=1, prefill=64, decode=24, prompts=2, new_tokens=8,
                   passkey_lengths=(200,), passkey_trials=1, progress=False)
    full = ev(KVPlan.uniform(2, 16, 16))
    assert full.kl == 0 and full.top1 == 1 and full.ppl == full.full_ppl and full.generation_agreement == 1
    assert full.generation_prefix == 8 and full.tokens_scored == 24 and set(full.passkey) == {200}
    low = ev(KVPlan.uniform(2, 2, 2, "kivi", group_size=8, residual_length=8))
    assert low.kl > 0 and low.ppl != low.full_ppl and low.equivalent_bits == 2
    assert full.window_nll_delta == [0.0] and len(low.window_nll_delta) == 1
    assert math.exp(low.window_nll_delta[0]) == pytest.approx(low.ppl / low.full_ppl, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        low.ppl_delta_interval()
    two = Evaluator(model, CharTokenizer(), TEXT, windows=2, prefill=32, decode=16, prompts=1, new_tokens=4,
                    passkey_lengths=(), progress=False)(KVPlan.uniform(2, 2, 2, "kivi", group_size=8, residual_length=8))
    lo, hi = two.ppl_delta_interval()
    mean = math.expm1(sum(two.window_nll_delta) / 2)
    assert lo <= mean <= hi and lo < hi
    # per-window KL: its token-weighted mean is the report's KL; paired ratios between two plans
    assert len(two.window_kl) == 2 and sum(two.window_kl) / 2 == pytest.approx(two.kl, rel=1e-6)
    ev2 = Evaluator(model, CharTokenizer(), TEXT, windows=2, prefill=32, decode=16, prompts=0, passkey_lengths=(),
                    progress=False)
    k4 = ev2(KVPlan.uniform(2, 4, 4, "kivi", group_size=8, residual_length=8))
    k2 = ev2(KVPlan.uniform(2, 2, 2, "kivi", group_size=8, residual_length=8))
    ratio, rlo, rhi = k2.kl_ratio_interval(k4)
    geo = math.exp(sum(math.log(a / b) for a, b in zip(k2.window_kl, k4.window_kl)) / 2)
    assert ratio == pytest.approx(geo) and rlo <= ratio <= rhi and ratio > 1  # 2 bits lose more than 4
    assert k4.kl_ratio_interval(k4)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        low.kl_ratio_interval(low)
    with pytest.raises(ValueError, match="evaluation text has"):
        Evaluator(model, CharTokenizer(), "tiny", progress=False)
    # no generation prompts: quality is still measured, agreement is NaN (nothing compared), not a crash
    none = Evaluator(model, CharTokenizer(), TEXT, windows=1, prefill=32, decode=16, prompts=0,
                     passkey_lengths=(), progress=False)(KVPlan.uniform(2, 4, 4, "kivi", group_size=8, residual_length=8,
                                                                        sink_length=2))
    assert none.kl > 0 and math.isnan(none.generation_agreement) and math.isnan(none.generation_prefix)
    for bad in (dict(windows=0), dict(prompts=-1), dict(decode=True)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.* is invalid"):
            Evaluator(model, CharTokenizer(), TEXT, progress=False, **bad)


def test_head_errors_shape_and_order():
    from kvtuner.profiling import head_errors
    from kvtuner.testing import tiny_model

    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=32)
    batches = [torch.randint(3, 100, (1, 64), generator=torch.Generator().manual_seed(0))]
    err = head_errors(model, batches, [(8, 8), (2, 2)], "kivi")
    assert err.shape == (2, 2, 2)
    assert (err > 0).all()
    assert (err[..., 1] > err[..., 0]).all()  # 2 bits lose more than 8 bits in every head
    with pytest.raises(PlanError, match="mode"):
        head_errors(model, batches, [(4, 4)], "nope")


def test_search_chooses_rotation_per_layer():
    from kvtuner.search import build_space, search

    model = tiny_model("llama", layers=2)
    pairs = [(4, 4), (4, 2), (2, 4), (2, 2)]
    kw = dict(modes=["kivi"], pairs=pairs, num_sequences=1, seq_len=128, kl_pairs=pairs, progress=False)
    plain = profile(model, CharTokenizer(), TEXT, **kw)
    rot = profile(model, CharTokenizer(), TEXT, rotation=True, **kw)
    space = build_space(plain, "kivi", cluster=False, rotated=rot)
    for layer in range(2):
        kept = space.candidates[layer]
        for p in pairs:  # at each pair, the kept option is the better of plain and rotated
            e_plain, e_rot = space.errors[layer][p], space.errors[layer][(*p, 1)]
            assert e_rot == rot.kl["kivi"][LayerSpec.pair(*p).name][layer]
            if p in kept:
                assert e_plain <= e_rot
            if (*p, 1) in kept:
                assert e_rot <= e_plain
    assert any(len(p) == 3 for c in space.candidates for p in c)  # rotation wins somewhere
    front = search(plain, mode="kivi", progress=False, cluster=False, rotated=rot)
    for point in front.points:  # plans carry each layer's own choice
        for layer, (spec, pair) in enumerate(zip(point.plan.layers, point.plan.pairs)):
            assert spec.k.rotation == spec.v.rotation
            opt = (*pair, 1) if spec.k.rotation else pair
            assert opt in space.candidates[layer]
    with pytest.raises(PlanError, match="rotation=True"):
        build_space(rot, "kivi", rotated=plain)


def test_layer_kl_measures_only_the_pairs_asked_per_layer():
    from kvtuner.profiling import calibration_batches, layer_kl

    model = tiny_model("llama", layers=2)
    batches = calibration_batches(CharTokenizer(), TEXT, 2, 96)
    only = [[(2, 2)], [(4, 2), (2, 2)]]
    kl = layer_kl(model, batches, [(4, 2), (2, 2)], ["kivi"], only=only, progress=False)["kivi"]
    assert kl["K4V2"][0] is None and kl["K4V2"][1] is not None and None not in kl["KV2"]
    full = layer_kl(model, batches, [(4, 2), (2, 2)], ["kivi"], progress=False)["kivi"]
    assert kl["KV2"] == pytest.approx(full["KV2"]) and kl["K4V2"][1] == pytest.approx(full["K4V2"][1])
    with pytest.raises(ValueError, match="one collection of pairs per layer"):
        layer_kl(model, batches, [(2, 2)], ["kivi"], only=only[:1], progress=False)


@pytest.mark.gpu
def test_profiling_stages_on_the_gpu_match_the_cpu():
    # the stages of `kvtuner tune` (attention-error profile, one-layer KL, measured objective, held-out
    # evaluation) on a CUDA device give the CPU's numbers for the same fp32 model
    from kvtuner.profiling import calibration_batches, layer_kl
    from kvtuner.search.objectives import KLObjective

    model = tiny_model("llama", layers=2)
    batches = calibration_batches(CharTokenizer(), TEXT, 2, 128)
    plan = KVPlan.uniform(2, 2, 2, "per_token")
    got = {}
    for dev in ("cpu", "cuda"):
        model = model.to(dev)
        tab = profile(model, CharTokenizer(), TEXT, modes=["kivi"], pairs=[(4, 2), (2, 2)], num_sequences=2,
                      seq_len=128, progress=False)
        kl = layer_kl(model, batches, [(2, 2)], ["kivi"], progress=False)["kivi"]["KV2"]
        ev = Evaluator(model, CharTokenizer(), TEXT, windows=2, prefill=32, decode=16, prompts=1, new_tokens=4,
                       passkey_lengths=(), progress=False)
        got[dev] = (tab.output_error["kivi"], kl, KLObjective(model, batches, prefill=64, chunk=16)(plan),
                    ev(plan).kl)
    cpu, gpu = got["cpu"], got["cuda"]
    assert torch.allclose(torch.tensor(cpu[0]), torch.tensor(gpu[0]), rtol=1e-3, atol=1e-6)
    for a, b in zip((cpu[1], cpu[2], cpu[3]), (gpu[1], gpu[2], gpu[3])):
        assert a == pytest.approx(b, rel=0.05, abs=1e-7)
