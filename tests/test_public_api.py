"""The public surface and a cheap import."""

import subprocess
import sys

import kvtuner


def test_public_names():
    assert sorted(kvtuner.__all__) == sorted([
        "Evaluator", "KVPlan", "LayerSpec", "MixedPrecisionCache", "ModelDims", "PlanError", "QualityReport",
        "QuantSpec", "QuantizedKVLayer", "SensitivityTable", "__version__", "default_texts", "evaluate", "load_model",
        "perplexity", "profile", "KernelPolicy", "generate", "greedy_generate", "StaticDecoder", "with_cache"])


KINDS = {"Evaluator": "class", "KVPlan": "class", "KernelPolicy": "class", "LayerSpec": "class",
         "MixedPrecisionCache": "class", "ModelDims": "class", "PlanError": "class", "QualityReport": "class",
         "QuantSpec": "class", "QuantizedKVLayer": "class", "SensitivityTable": "class", "StaticDecoder": "class",
         "__version__": "str", "default_texts": "function", "evaluate": "function", "greedy_generate": "function", "generate": "function",
         "load_model": "function", "perplexity": "function", "profile": "function", "with_cache": "function"}


def _kind(obj) -> str:
    import inspect

    return "class" if inspect.isclass(obj) else "str" if isinstance(obj, str) else (
        "function" if callable(obj) and not inspect.ismodule(obj) else type(obj).__name__)


def test_every_exported_name_has_its_kind_whatever_was_touched_before():
    # a submodule import binds the submodule's name on the package: kvtuner.evaluate (a function) must not
    # turn into the module kvtuner.evaluate once another name from that module was used
    assert set(KINDS) == set(kvtuner.__all__)
    code = ("import importlib, inspect, json, sys, kvtuner\n"
            "order = sys.argv[1:]\n"
            "for name in order: getattr(kvtuner, name)\n"
            "import kvtuner.evaluation, kvtuner.profiling, kvtuner.generation, kvtuner.cache, kvtuner.models\n"
            "from kvtuner import evaluate\n"
            "print(json.dumps({n: ('class' if inspect.isclass(getattr(kvtuner, n)) else 'str' if isinstance("
            "getattr(kvtuner, n), str) else 'function' if callable(getattr(kvtuner, n)) and not "
            "inspect.ismodule(getattr(kvtuner, n)) else 'module') for n in kvtuner.__all__} | "
            "{'from_import': 'function' if callable(evaluate) and not inspect.ismodule(evaluate) else 'module'}))\n")
    import json

    for order in ([], ["Evaluator"], sorted(kvtuner.__all__), sorted(kvtuner.__all__, reverse=True)):
        out = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, check=True)
        kinds = json.loads(out.stdout)
        assert kinds.pop("from_import") == "function"
        assert kinds == KINDS, order
    for name in kvtuner.__all__:
        assert _kind(getattr(kvtuner, name)) == KINDS[name], name


def test_import_is_lean():
    code = ("import sys, kvtuner; heavy = [m for m in ('torch', 'transformers', 'triton', 'optuna') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kvtuner.nope  # noqa: B018
