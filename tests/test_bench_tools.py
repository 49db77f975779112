"""Helpers of the benchmark scripts that decide what they measure (CPU)."""

import sys
from pathlib import Path

import pytest

from kvtuner import KVPlan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
bench_decode = pytest.importorskip("bench_decode")


def test_plan_files_transplant_layer_specs(tmp_path):
    plan = KVPlan.from_pairs([(3, 3), (4, 3)], "kivi")
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=16, vocab_size=32)
    path = plan.for_model(cfg).save(tmp_path / "p.json")
    got = bench_decode.plan_files([f"mine={path}"], 2)["mine"]
    assert got.layers == plan.layers and not got.model  # the searched model's shape is not imposed
    with pytest.raises(SystemExit, match="allowed: --layers 2"):
        bench_decode.plan_files([f"mine={path}"], 32)
    with pytest.raises(SystemExit, match="NAME=PATH"):
        bench_decode.plan_files([str(path)], 2)


def test_every_benchmark_script_compiles():
    import py_compile
    from pathlib import Path

    scripts = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))
    assert len(scripts) >= 10
    for script in scripts:
        py_compile.compile(str(script), doraise=True)


def test_share_of_hbm_peak_names_the_gpu_it_was_measured_on():
    import provenance

    assert provenance.hbm_peak("NVIDIA H100 80GB HBM3") == 3.35e12 and provenance.hbm_peak("NVIDIA H200") == 4.8e12
    with pytest.raises(ValueError, match="no HBM peak known"):
        provenance.hbm_peak("NVIDIA A100-SXM4-80GB")
