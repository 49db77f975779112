"""Models placed by accelerate's ``device_map``: weights over several devices (or offloaded), same results."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="needs the tune extra: pip install 'kvtuner[tune]'")

from kvtuner import KVPlan, load_model
from kvtuner.data import default_texts
from kvtuner.pipeline import TuneSettings, run_tune

SMALL = {"budgets": (3.25,), "trials": 0, "sequences": 1, "seq_len": 96, "kl_seq_len": 96, "eval_windows": 2,
         "eval_prefill": 48, "eval_decode": 16}


def _tune(model, tok, out):
    result = run_tune(model, tok, default_texts("calibration"), default_texts("evaluation"), out,
                      settings=TuneSettings(**SMALL), progress=False, log=lambda msg: None)
    return KVPlan.load(result.plans[3.25]), {r["name"]: r for r in result.quality}


@pytest.fixture(scope="module")
def tiny_dir(saved_tiny_model):
    return saved_tiny_model("llama", layers=4, heads=4, kv_heads=2, head_dim=32)


def test_tune_command_takes_a_device_map(tiny_dir, tmp_path):
    # accelerate places the weights (here: all on the CPU, the only device) and the log says where
    import os
    import subprocess
    import sys

    out = tmp_path / "dm"
    r = subprocess.run([sys.executable, "-c", "from kvtuner.cli import main; main()", "tune", "--model", str(tiny_dir),
                        "--device-map", "auto", "--out", str(out), "--budget-bits", "3.25", "--trials", "0",
                        "--sequences", "1", "--seq-len", "96", "--kl-tokens", "96", "--eval-windows", "2",
                        "--eval-prefill", "48", "--eval-decode", "16"],
                       check=False, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "weights placed by accelerate (device_map=auto): one device" in r.stderr
    assert KVPlan.load(out / "plan-3.25.json").equivalent_bits <= 3.25


@pytest.mark.gpu
def test_tune_with_layers_split_between_gpu_and_cpu_matches_one_device(tiny_dir, tmp_path):
    # half the decoder layers offloaded to CPU memory: accelerate's hooks move activations between the
    # devices, each layer's cache lives where its layer runs, and the tune gives the one-device results
    import torch

    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0,
             **{f"model.layers.{i}": (0 if i % 2 == 0 else "cpu") for i in range(4)}}
    model, tok = load_model(str(tiny_dir), device_map=split, dtype=torch.float32)
    assert set(map(str, model.hf_device_map.values())) == {"0", "cpu"}
    plan, quality = _tune(model, tok, tmp_path / "split")
    whole, tok = load_model(str(tiny_dir), device="cuda", dtype=torch.float32)
    _, quality1 = _tune(whole, tok, tmp_path / "one")
    assert plan.num_layers == 4 and plan.equivalent_bits <= 3.25
    for name, row in quality1.items():
        assert quality[name]["full_ppl"] == pytest.approx(row["full_ppl"], rel=1e-4), name
        assert quality[name]["kl"] == pytest.approx(row["kl"], rel=0.05, abs=1e-6), name
