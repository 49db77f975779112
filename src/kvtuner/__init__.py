"""kvtuner: layer-wise mixed-precision KV cache quantization (KVTuner, ICML 2025), re-implemented.

``import kvtuner`` is cheap: torch and transformers load on first use of the names that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .spec import KVPlan, LayerSpec, ModelDims, PlanError, QuantSpec  # noqa: E402  (no torch import)

_LAZY = {
    "MixedPrecisionCache": "cache",
    "QuantizedKVLayer": "cache",
    "load_model": "models",
    "with_cache": "models",
    "default_texts": "data",
    "perplexity": "evaluation",
    "evaluate": "evaluation",
    "Evaluator": "evaluation",
    "QualityReport": "evaluation",
    "profile": "profiling",
    "SensitivityTable": "profiling",
    "KernelPolicy": "policy",
    "generate": "generation",
    "greedy_generate": "generation",
    "StaticDecoder": "generation",
}

__all__ = [
    "Evaluator",
    "KVPlan",
    "KernelPolicy",
    "LayerSpec",
    "MixedPrecisionCache",
    "ModelDims",
    "PlanError",
    "QualityReport",
    "QuantSpec",
    "QuantizedKVLayer",
    "SensitivityTable",
    "StaticDecoder",
    "__version__",
    "default_texts",
    "evaluate",
    "generate",
    "greedy_generate",
    "load_model",
    "perplexity",
    "profile",
    "with_cache",
]

if TYPE_CHECKING:
    from .cache import MixedPrecisionCache, QuantizedKVLayer
    from .data import default_texts
    from .evaluation import Evaluator, QualityReport, evaluate, perplexity
    from .generation import StaticDecoder, generate, greedy_generate
    from .models import load_model, with_cache
    from .policy import KernelPolicy
    from .profiling import SensitivityTable, profile


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'kvtuner' has no attribute {name!r}")
