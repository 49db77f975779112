"""`kvtuner tune` end to end on a tiny random model, and its user errors."""

from __future__ import annotations

import json
from pathlib import Path
import os
import subprocess
import sys

import pytest

pytest.importorskip("optuna", reason="needs the tune extra: pip install 'kvtuner[tune]'")
pytest.importorskip("matplotlib", reason="needs the tune extra: pip install 'kvtuner[tune]'")


def _run(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no network here: fail fast instead of retrying
    return subprocess.run([sys.executable, "-c", "from kvtuner.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_dir(saved_tiny_model):
    return saved_tiny_model("llama", layers=3, heads=4, kv_heads=2, head_dim=32)


def test_tune_end_to_end_on_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = ("tune", "--model", str(tiny_dir), "--out", str(out), "--budget-bits", "3.25", "--budget-bits", "4",
            "--trials", "3", "--sequences", "2", "--seq-len", "160", "--eval-prefill", "96", "--eval-decode", "48",
            "--quiet")
    r = _run(*args)  # no time bound here: a shared CI core makes it flaky (speed lives in benchmarks)
    assert r.returncode == 0, r.stderr
    for name in ("table.json", "front.json", "plan-3.25.json", "plan-4.json", "report.html", "report.md",
                 "sensitivity.png", "front.png", "allocation.png", "quality.json"):
        assert (out / name).stat().st_size > 0, name
    from kvtuner import KVPlan

    for b in (3.25, 4.0):
        plan = KVPlan.load(out / f"plan-{b:g}.json")
        assert plan.num_layers == 3 and plan.equivalent_bits <= b
        assert plan.provenance["preset"] == "recommended" and plan.provenance["settings"]["bits"] == [8, 4, 3, 2]
        assert plan.key_rounding is not None and plan.key_rounding.moments.shape == (3, 2, 32, 32)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "uniform KV4" in page
    # it opens with a recommendation naming a plan file, with the paired KL ratio to uniform KV4
    advice = page.split('class="advice">')[1].split("</p>")[0]
    assert advice.startswith("Use plan-") and "x uniform KV4&#x27;s" in advice
    rows = json.loads((out / "quality.json").read_text())["rows"]
    assert {r["name"] for r in rows} >= {"searched <= 3.25", "uniform KV4", "uniform K4V2"}
    # a rerun reuses the table and the evaluation, and prints JSON
    r2 = _run(*args[:-1], "--json")
    assert r2.returncode == 0, r2.stderr
    summary = json.loads(r2.stdout)
    assert set(summary["reused"]) == {"table", "evaluation"}
    # every file in the directory is counted, the manifest and the study included
    assert sorted(Path(f).name for f in summary["files"]) == sorted(p.name for p in out.iterdir())


def test_tune_rotation_per_layer(tiny_dir, tmp_path):
    """--rotation per-layer: a plain and a rotated table; the search's candidates hold both kinds.
    --refine 3: three measured local-search trials after NSGA-II. --sink 2: both tables are profiled
    with two full-precision sink tokens, and the plan keeps them."""
    out = tmp_path / "rot"
    r = _run("tune", "--model", str(tiny_dir), "--out", str(out), "--budget-bits", "3.25", "--trials", "2",
             "--sequences", "1", "--seq-len", "96", "--eval-prefill", "48", "--eval-decode", "16",
             "--rotation", "per-layer", "--sink", "2", "--refine", "3", "--preset", "paper", "--quiet")
    assert r.returncode == 0, r.stderr
    from kvtuner import KVPlan
    from kvtuner.profiling import SensitivityTable

    plain, rotated = SensitivityTable.load(out / "table.json"), SensitivityTable.load(out / "table-rotated.json")
    assert not plain.rotation and rotated.rotation
    assert plain.sink_length == rotated.sink_length == 2
    cands = json.loads((out / "front.json").read_text())["info"]["candidates"]
    assert any(len(p) == 3 for c in cands for p in c) and any(len(p) == 2 and p != [16, 16] for c in cands for p in c)
    plan = KVPlan.load(out / "plan-3.25.json")
    # the paper preset's settings, with the flags given on top of it
    assert plan.provenance["preset"] == "paper" and plan.provenance["settings"]["bits"] == [8, 4, 2]
    assert {b for lay in plan.layers for b in (lay.k.bits, lay.v.bits)} <= {2, 4, 8}
    assert plan.equivalent_bits <= 3.25 and plan.provenance["settings"]["rotation"] == "per_layer"
    assert plan.provenance["refine_trials"] == 3  # measured local-search trials, stored in the study
    assert plan.provenance["settings"]["sink"] == 2 and {(lay.k.sink_length, lay.v.sink_length) for lay in plan.layers} <= {(2, 2),
                                                                                                        (0, 0)}
    assert any(lay.k.sink_length == 2 for lay in plan.layers)
    assert plan.key_rounding is None and plan.provenance["settings"]["key_rounding"] is False  # the paper's codes


@pytest.mark.parametrize("args,needle", [
    (("--rotation", "sometimes"), "rotation='sometimes'"),
    (("--model", "no/such-model-xyz"), "no/such-model-xyz"),
    (("--text", "/nonexistent/text.txt"), "--text"),
    (("--budget-bits", "1.5"), "budget-bits=1.5"),
    (("--budget-bits", "17"), "budget-bits=17"),
    (("--sink", "-1"), "sink=-1"),
    (("--refine", "-1"), "refine=-1"),
    (("--trials", "0", "--refine", "4"), "refine=4"),
    (("--preset", "fastest"), "preset='fastest'"),
    (("--kl-windows", "0"), "kl-windows=0"),
])
def test_tune_user_errors(tmp_path, args, needle):
    r = _run("tune", "--out", str(tmp_path / "o"), *args, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and needle in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_tune_unreadable_text(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00\x81" * 10)
    r = _run("tune", "--text", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "not readable" in r.stderr and "Traceback" not in r.stderr


def test_tune_out_dir_of_another_model(tiny_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "kvtuner-run.json").write_text(json.dumps({"model": {"num_layers": 99, "num_kv_heads": 1, "head_dim": 8}}))
    r = _run("tune", "--model", str(tiny_dir), "--out", str(out), "--trials", "0")
    assert r.returncode != 0 and "another model" in r.stderr and "Traceback" not in r.stderr


def test_tune_config_file_and_override(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text('budget-bits = [1.0]\nmode = "kivi"\n')
    r = _run("tune", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "budget-bits=1.0" in r.stderr  # from the file
    cfg.write_text('colour = "red"\n')
    r = _run("tune", "--config", str(cfg))
    assert r.returncode != 0 and "unknown option" in r.stderr


def test_generate_and_bench_verbs(tiny_dir, tmp_path):
    from kvtuner import KVPlan

    plan = KVPlan.uniform(3, 4, 2, "kivi").save(tmp_path / "p.json")
    r = _run("generate", "--model", str(tiny_dir), "--plan", str(plan), "--prompt", "The with statement is",
             "--max-new-tokens", "40")
    assert r.returncode == 0, r.stderr
    assert "cache:" in r.stderr and "bytes" in r.stderr and r.stdout.strip()
    # the prompt, then the plan's text and a full-precision cache's text for the same prompt and seed
    out = r.stdout
    assert out.startswith("prompt: The with statement is") and "plan (3.00 bits):" in out and "full precision:" in out
    r = _run("generate", "--model", str(tiny_dir), "--plan", str(plan), "--max-new-tokens", "8", "--no-compare",
             "--sample")
    assert r.returncode == 0 and "full precision:" not in r.stdout, r.stderr
    r = _run("bench", "--model", str(tiny_dir), "--plan", str(plan), "--tokens", "96", "--steps", "8")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "ms/token" in ln]
    assert len(lines) == 2 and "plan 3.00 bits" in lines[1]


def test_missing_optional_dependency_names_the_extra(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "optuna.py").write_text("raise ImportError('No module named optuna')\n")
    (blocker / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", "from kvtuner.cli import main; main()", "tune", "--trials", "1",
                        "--model", "/nonexistent-but-checked-later", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "pip install 'kvtuner[" in r.stderr, r.stderr


def test_default_tune_on_head_dim_256_and_one_kv_head(saved_tiny_model, tmp_path):
    # the recommended preset's whole pipeline (2/3/4/8-bit pairs, rotation per layer, one sink token,
    # three budgets) on the shapes of Gemma-style head_dim 256 and multi-query attention
    model_dir = saved_tiny_model("llama", layers=2, heads=4, kv_heads=1, head_dim=256)
    out = tmp_path / "hd256"
    r = _run("tune", "--model", str(model_dir), "--out", str(out), "--sequences", "1", "--seq-len", "96",
             "--kl-tokens", "96", "--eval-windows", "2", "--eval-prefill", "48", "--eval-decode", "16", "--trials", "2",
             "--quiet")
    assert r.returncode == 0, r.stderr
    from kvtuner import KVPlan

    for b in (3.0, 3.25, 4.0):
        plan = KVPlan.load(out / f"plan-{b:g}.json")
        assert plan.equivalent_bits <= b and plan.provenance["preset"] == "recommended"
        assert {lay.k.sink_length for lay in plan.layers} == {1}
    assert (out / "table-rotated.json").exists() and (out / "report.html").stat().st_size > 0
