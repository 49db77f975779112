"""Plans and specs: validation messages, JSON round trips, atomic writes, analytical bytes."""

import json

import pytest

from kvtuner import KVPlan, LayerSpec, ModelDims, PlanError, QuantSpec

DIMS = ModelDims(num_layers=4, num_kv_heads=2, head_dim=64, model_type="llama",
                 layer_types=("full_attention",) * 4)


def test_quantspec_defaults_follow_mode():
    assert QuantSpec(4, "kivi") == QuantSpec(4, "kivi", 32, 32)
    assert QuantSpec(4, "per_token").group_size is None and QuantSpec(4, "per_token").residual_length == 0


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=5), "bits"), (dict(bits=True), "bits"), (dict(bits=4, mode="per_head"), "mode"),
    (dict(bits=4, group_size=0), "group_size"), (dict(bits=4, residual_length=-1), "residual_length"),
    (dict(bits=4, sink_length=-1), "sink_length"), (dict(bits=4, sink_length=True), "sink_length"),
    (dict(bits=4, sink_length=2.0), "sink_length"),
])
def test_quantspec_rejects_bad_values_in_one_line(kwargs, field):
    with pytest.raises(PlanError) as e:
        QuantSpec(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg and field in msg and "allowed" in msg


def test_equivalent_bits_and_names():
    plan = KVPlan.from_pairs([(8, 4), (4, 2), (2, 2), (8, 8)])
    assert plan.equivalent_bits == pytest.approx((6 + 3 + 2 + 8) / 4)
    assert [layer.name for layer in plan.layers] == ["K8V4", "K4V2", "KV2", "KV8"]
    assert KVPlan.uniform(30, 4, 2).equivalent_bits == 3.0


def test_round_trip(tmp_path):
    plan = KVPlan.from_pairs([(8, 4), (4, 2), (2, 2), (16, 8)], mode="per_token", group_size=32,
                             model_id="tiny", provenance={"note": "x"}).for_model(DIMS)
    path = plan.save(tmp_path / "p.kvplan.json")
    data = json.loads(path.read_text())
    assert data["_type"] == "KVPlan" and data["_version"] == 1 and data["num_layers"] == 4
    again = KVPlan.load(path, config=DIMS)
    assert again == plan and again.model["head_dim"] == 64 and again.provenance["note"] == "x"


def _write(tmp_path, data):
    p = tmp_path / "bad.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def _good():
    return KVPlan.uniform(4, 4, 2).to_dict()


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(_type="Other"), "_type"),
    (lambda d: d.update(_version=99), "newer kvtuner"),
    (lambda d: d.update(layers=[]), "plan.layers"),
    (lambda d: d["layers"][2]["k"].update(bits=5), "plan.layers[2].k.bits=5"),
    (lambda d: d["layers"][1]["v"].update(mode="fp8"), "plan.layers[1].v.mode"),
    (lambda d: d["layers"][0]["k"].update(group_size=-4), "plan.layers[0].k.group_size"),
    (lambda d: d["layers"][0]["k"].pop("bits"), "plan.layers[0].k.bits"),
    (lambda d: d["layers"][0]["k"].update(nbits=4), "plan.layers[0].k.nbits"),
    (lambda d: d.update(num_layers=5), "plan.num_layers"),
])
def test_load_rejects_bad_files(tmp_path, mutate, needle):
    data = _good()
    mutate(data)
    with pytest.raises(PlanError) as e:
        KVPlan.load(_write(tmp_path, data))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_malformed_json_names_position(tmp_path):
    with pytest.raises(PlanError, match=r"not valid JSON \(line 1"):
        KVPlan.load(_write(tmp_path, '{"_type": "KVPlan",'))
    with pytest.raises(PlanError, match="no such file"):
        KVPlan.load(tmp_path / "missing.json")


def test_layer_count_checked_against_config(tmp_path):
    path = KVPlan.uniform(30, 4, 4).save(tmp_path / "p.json")
    with pytest.raises(PlanError, match=r"plan.num_layers=30 does not match the model; allowed: 4"):
        KVPlan.load(path, config=DIMS)


def test_per_token_group_larger_than_head_dim_is_rejected():
    plan = KVPlan.uniform(4, 4, 4, "per_token", group_size=128)
    with pytest.raises(PlanError, match="group_size=128 exceeds"):
        plan.check_config(DIMS)


def test_failed_save_keeps_previous_file(tmp_path):
    path = KVPlan.uniform(4, 8, 8).save(tmp_path / "p.json")
    before = path.read_text()
    bad = KVPlan(KVPlan.uniform(4, 2, 2).layers, provenance={"x": object()})
    with pytest.raises(TypeError):
        bad.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temp file left behind


def test_bytes_per_token_counts_codes_and_metadata():
    # head_dim 64, 2 kv heads, 4 layers, bf16 metadata
    kivi = KVPlan.uniform(4, 4, 2, "kivi")
    k = 64 / 2 + 2 * 64 * 2 / 32  # 4-bit codes + per-channel scale/zero amortised over 32 tokens
    v = 64 / 4 + 2 * 2 * 2  # 2-bit codes + two channel groups of 32, scale+zero each
    assert kivi.bytes_per_token(DIMS) == pytest.approx(4 * 2 * (k + v))
    pt = KVPlan.uniform(4, 8, 8, "per_token")
    assert pt.bytes_per_token(DIMS) == pytest.approx(4 * 2 * 2 * (64 + 4))
    assert KVPlan.uniform(4, 16, 16).bytes_per_token(DIMS) == 4 * 2 * 2 * 128


def test_split_keeps_residual_window_and_whole_groups():
    spec = QuantSpec(4, "kivi")
    assert spec.split("key", 10) == (0, 10)
    assert spec.split("key", 64) == (32, 32)
    assert spec.split("key", 65) == (32, 33)
    assert spec.split("key", 96) == (64, 32)
    assert QuantSpec(4, "per_token").split("value", 65) == (65, 0)
    assert QuantSpec(16).split("key", 65) == (0, 65)


def test_layerspec_requires_quantspecs():
    with pytest.raises(PlanError, match="LayerSpec.k"):
        LayerSpec(4, QuantSpec(4))


def test_rotation_and_three_bit_round_trip_names_and_bytes(tmp_path):
    plan = KVPlan((LayerSpec.pair(4, 3, rotation=True), LayerSpec(QuantSpec(4), QuantSpec(2, rotation=True)),
                   LayerSpec.pair(16, 6, rotation=True), LayerSpec.pair(3, 3)))
    assert [layer.name for layer in plan.layers] == ["K4rV3r", "K4V2r", "K16V6r", "KV3"]
    assert not plan.layers[2].k.rotation  # 16-bit tensors are never rotated
    again = KVPlan.load(plan.save(tmp_path / "p.json"))
    assert again == plan and again.layers[1].v.rotation and not again.layers[1].k.rotation
    assert "rotation" not in json.dumps(KVPlan.uniform(2, 4, 2).to_dict())  # old plans read and write as before
    # 3-bit codes are 3 bits per element plus the same metadata as 2 or 4 bits
    for role in ("key", "value"):
        b2, b3, b4 = (QuantSpec(b).bytes_per_token(role, 128) for b in (2, 3, 4))
        assert b3 - b2 == b4 - b3 == 128 / 8
    with pytest.raises(PlanError, match="rotation"):
        QuantSpec(4, rotation="yes")


def test_sink_length_round_trip_and_accounting():
    spec = QuantSpec(2, "kivi", sink_length=4)
    assert spec.to_dict()["sink_length"] == 4 and QuantSpec.from_dict(spec.to_dict()) == spec
    assert "sink_length" not in QuantSpec(2).to_dict()  # plans without sinks read and write as before
    assert QuantSpec.from_dict({"bits": 2}).sink_length == 0
    assert QuantSpec(16, sink_length=4).sink_length == 0  # full precision needs no sink
    assert (spec.kept_sink(sliding=False), spec.kept_sink(sliding=True)) == (4, 0)  # one rule for cache and profile
    # 100 tokens: 4 sink + 32 residual window leave 64 = two whole 32-token groups to quantize
    assert spec.split("key", 100) == (64, 36) and spec.split("key", 67) == (0, 67)
    assert QuantSpec(2, "per_token", sink_length=4).split("key", 10) == (6, 4)
    plan = KVPlan.uniform(3, 4, 2, sink_length=2)
    again = KVPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and all(layer.k.sink_length == layer.v.sink_length == 2 for layer in again.layers)
    with pytest.raises(PlanError, match="sink_length"):
        QuantSpec.from_dict({"bits": 2, "sink_length": "four"})
