"""The public surface and a cheap import."""

import subprocess
import sys

import kvtuner


def test_public_names():
    assert sorted(kvtuner.__all__) == sorted([
        "Evaluator", "KVPlan", "LayerSpec", "MixedPrecisionCache", "ModelDims", "PlanError", "QualityReport",
        "QuantSpec", "QuantizedKVLayer", "SensitivityTable", "__version__", "default_texts", "evaluate", "load_model",
        "perplexity", "profile", "get_backend", "set_backend", "greedy_generate", "StaticDecoder", "with_cache"])
    for name in kvtuner.__all__:
        assert getattr(kvtuner, name) is not None


def test_import_is_lean():
    code = ("import sys, kvtuner; heavy = [m for m in ('torch', 'transformers', 'triton', 'optuna') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kvtuner.nope  # noqa: B018
