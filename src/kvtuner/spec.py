"""Plans: which (key bits, value bits) and quantization mode each layer of a model uses.

A :class:`KVPlan` is the only thing the offline tools (profiling, search) hand to the online cache.
It is a small, versioned JSON file::

    {"_type": "KVPlan", "_version": 1, "model_id": "smollm2", "num_layers": 30,
     "model": {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "model_type": "llama"},
     "layers": [{"k": {"bits": 8, "mode": "kivi", "group_size": 32, "residual_length": 32},
                 "v": {"bits": 4, "mode": "kivi", "group_size": 32, "residual_length": 32}}, ...],
     "provenance": {"kvtuner_version": "0.1.0", ...}}

Modes (see ``quant.py`` for the numerics):

* ``"per_token"``: asymmetric min/max over one token of one head, either the whole head_dim
  (``group_size=None``) or groups of ``group_size`` channels. No residual window by default.
* ``"kivi"``: keys per channel over groups of ``group_size`` consecutive tokens; values per token
  over groups of ``group_size`` channels; the newest ``residual_length`` tokens stay in full
  precision. Defaults 32/32 as in KIVI and KVTuner.

``bits=16`` means "keep this tensor in full precision" (stored in the model's dtype).

This module deliberately imports neither torch nor transformers: configs are read by duck typing.
"""

from __future__ import annotations

import dataclasses

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BITS = (2, 3, 4, 6, 8, 16)
QUANTIZED_BITS = (2, 4, 8)  # the paper's choices: profiling's default candidates
PLANE_WIDTHS = {2: (2,), 3: (2, 1), 4: (4,), 6: (4, 2), 8: (8,)}  # bit planes per code width, low bits first


def packed_width(dim: int, bits: int) -> int:
    """Bytes of codes per token for ``dim`` channels of ``bits``-bit codes (all bit planes, see ``quant.py``)."""
    return sum(math.ceil(dim / (8 // w)) for w in PLANE_WIDTHS[bits])
MODES = ("per_token", "kivi")
KIVI_GROUP_SIZE = 32
KIVI_RESIDUAL_LENGTH = 32
PLAN_VERSION = 2  # 2: optional key_rounding (query-aware key codes); plans without it are written as 1


class PlanError(ValueError):
    """A plan, spec or plan file is invalid. The message is one line naming field, value and what is allowed."""


def _fail(where: str, value: Any, allowed: str) -> None:
    raise PlanError(f"{where}={value!r} is invalid; allowed: {allowed}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (the keys or the values of one layer) is stored.

    Args:
        bits: 2, 3, 4, 6 or 8 for packed integer codes (3 and 6 as bit planes, see ``quant.py``);
            16 keeps full precision.
        mode: ``"per_token"`` or ``"kivi"`` (see the module docstring).
        group_size: tokens per key group (kivi) or channels per group (per-token groups, kivi
            values). ``None`` for per_token means one group spanning the whole head_dim; for kivi it
            means the default 32.
        residual_length: newest tokens kept in full precision. ``None`` means the mode's default
            (kivi 32, per_token 0).
        rotation: quantize ``x @ H`` (orthonormal Hadamard over head_dim) instead of ``x`` (the
            full-precision tokens stay plain); the attention path rotates queries (keys) or rotates
            the output back (values) for the packed history. Needs a
            power-of-two head_dim; ignored (never applied) at 16 bits.
        sink_length: the oldest tokens of a sequence kept in full precision, as attention sinks
            (StreamingLLM's observation: most heads put much of their attention there, so their
            quantization error weighs on every later token). Quantized groups start after them.
            0 (the default, the paper's setting) keeps none; ignored at 16 bits and on sliding-window
            layers (whose window drops the oldest tokens).
    """

    bits: int = 16
    mode: str = "kivi"
    group_size: int | None = None
    residual_length: int | None = None
    rotation: bool = False
    sink_length: int = 0

    def __post_init__(self) -> None:
        self._validate("QuantSpec")

    def _validate(self, where: str) -> None:
        if not _is_int(self.bits) or self.bits not in BITS:
            _fail(f"{where}.bits", self.bits, "2, 3, 4, 6, 8 or 16")
        if self.mode not in MODES:
            _fail(f"{where}.mode", self.mode, " or ".join(repr(m) for m in MODES))
        gs, res = self.group_size, self.residual_length
        if gs is not None and (not _is_int(gs) or gs < 1):
            _fail(f"{where}.group_size", gs, "a positive integer or null")
        if res is not None and (not _is_int(res) or res < 0):
            _fail(f"{where}.residual_length", res, "a non-negative integer or null")
        if not isinstance(self.rotation, bool):
            _fail(f"{where}.rotation", self.rotation, "true or false")
        if not _is_int(self.sink_length) or self.sink_length < 0:
            _fail(f"{where}.sink_length", self.sink_length, "a non-negative integer")
        if self.bits >= 16:  # 16-bit tensors are never rotated and need no sink
            object.__setattr__(self, "rotation", False)
            object.__setattr__(self, "sink_length", 0)
        if self.mode == "kivi":
            object.__setattr__(self, "group_size", KIVI_GROUP_SIZE if gs is None else gs)
            object.__setattr__(self, "residual_length", KIVI_RESIDUAL_LENGTH if res is None else res)
        else:
            object.__setattr__(self, "residual_length", 0 if res is None else res)

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def kept_sink(self, sliding: bool) -> int:
        """Sink tokens a store of this spec keeps: none at 16 bits, and none in a sliding-window layer,
        whose window drops the oldest tokens, sinks included."""
        return 0 if sliding or not self.quantized else self.sink_length

    def packed_width(self, head_dim: int) -> int:
        """Bytes of codes per token of one head (all bit planes)."""
        return packed_width(head_dim, self.bits)

    def granularity(self, role: str) -> str:
        """``"per_token"`` (groups along head_dim) or ``"per_channel"`` (groups along tokens)."""
        if role not in ("key", "value"):
            raise ValueError(f"role={role!r} is invalid; allowed: 'key' or 'value'")
        return "per_channel" if (self.mode == "kivi" and role == "key") else "per_token"

    def channel_group(self, head_dim: int) -> int:
        """Channels per group for per-token granularity (the whole head when group_size is None)."""
        return head_dim if self.group_size is None else min(self.group_size, head_dim)

    def flush_unit(self, role: str) -> int:
        """Tokens moved from the residual to packed storage at a time.

        KIVI flushes whole token blocks (required for per-channel key groups; values follow the same
        rhythm so K and V stay in step). Per-token mode can quantize every token on its own.
        """
        if not self.quantized:
            return 1
        return self.group_size if self.mode == "kivi" else 1

    def split(self, role: str, num_tokens: int) -> tuple[int, int]:
        """(quantized, full-precision) token counts after ``num_tokens`` tokens were appended.

        The newest ``residual_length`` tokens and the oldest ``sink_length`` always stay in full
        precision; the tokens between are quantized in whole flush units, so at most
        ``flush_unit - 1`` extra tokens wait.
        """
        if not self.quantized:
            return 0, num_tokens
        unit = self.flush_unit(role)
        n_q = max(0, (num_tokens - self.sink_length - self.residual_length) // unit * unit)
        return n_q, num_tokens - n_q

    def quantized_bytes(self, role: str, num_tokens: int, head_dim: int, dtype_bytes: int = 2) -> int:
        """Exact bytes of packed codes + scales + zeros for ``num_tokens`` quantized tokens of one head."""
        if num_tokens == 0:
            return 0
        codes = num_tokens * self.packed_width(head_dim)
        if self.granularity(role) == "per_channel":
            groups = math.ceil(num_tokens / self.group_size) * head_dim
        else:
            groups = num_tokens * math.ceil(head_dim / self.channel_group(head_dim))
        return codes + 2 * groups * dtype_bytes

    def bytes_per_token(self, role: str, head_dim: int, dtype_bytes: int = 2) -> float:
        """Steady-state bytes per token per head (codes + metadata), ignoring the fixed residual."""
        if not self.quantized:
            return float(head_dim * dtype_bytes)
        codes = self.packed_width(head_dim)
        if self.granularity(role) == "per_channel":
            meta = 2 * head_dim * dtype_bytes / self.group_size
        else:
            meta = 2 * math.ceil(head_dim / self.channel_group(head_dim)) * dtype_bytes
        return codes + meta

    def to_dict(self) -> dict[str, Any]:
        d = {"bits": self.bits, "mode": self.mode, "group_size": self.group_size,
             "residual_length": self.residual_length}
        if self.rotation:  # omitted when off, so plans without rotation read as before
            d["rotation"] = True
        if self.sink_length:  # likewise
            d["sink_length"] = self.sink_length
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str = "QuantSpec") -> QuantSpec:
        if not isinstance(data, Mapping):
            _fail(where, data, "an object with bits, mode, group_size, residual_length")
        unknown = sorted(set(data) - {"bits", "mode", "group_size", "residual_length", "rotation", "sink_length"})
        if unknown:
            _fail(f"{where}.{unknown[0]}", data[unknown[0]],
                  "only bits, mode, group_size, residual_length, rotation, sink_length")
        if "bits" not in data:
            _fail(f"{where}.bits", None, "2, 3, 4, 6, 8 or 16 (the field is required)")
        spec = cls.__new__(cls)
        for name, default in (("bits", None), ("mode", "kivi"), ("group_size", None), ("residual_length", None),
                              ("rotation", False), ("sink_length", 0)):
            object.__setattr__(spec, name, data.get(name, default))
        spec._validate(where)
        return spec


@dataclass(frozen=True)
class LayerSpec:
    """The key and value specs of one decoder layer."""

    k: QuantSpec
    v: QuantSpec

    def __post_init__(self) -> None:
        for name in ("k", "v"):
            if not isinstance(getattr(self, name), QuantSpec):
                _fail(f"LayerSpec.{name}", getattr(self, name), "a QuantSpec")

    @property
    def equivalent_bits(self) -> float:
        return (self.k.bits + self.v.bits) / 2

    @property
    def name(self) -> str:
        """Paper-style label: ``KV4`` when bits are equal, else ``K8V4``; ``r`` marks a rotated
        tensor (``KV4r``: both rotated, ``K4V2r``: only the values)."""
        kr, vr = "r" * self.k.rotation, "r" * self.v.rotation
        if self.k.bits == self.v.bits and kr == vr:
            return f"KV{self.k.bits}{kr}"
        return f"K{self.k.bits}{kr}V{self.v.bits}{vr}"

    def held_tokens(self, spec: QuantSpec, role: str, seq_len: int, window: int | None = None) -> tuple[int, int]:
        """(quantized, full-precision) tokens this layer's ``spec`` (its key or value spec, ``role``)
        holds after a prefill of ``seq_len`` tokens; ``window``: the sliding window, ``None`` for
        full attention. A sliding layer keeps no sink and drops its oldest tokens in whole key groups
        once the window is full (``QuantizedKVLayer._evict``), quantized ones first."""
        if window is None:
            return spec.split(role, seq_len)
        n_q, n_fp = dataclasses.replace(spec, sink_length=0).split(role, seq_len)
        start = self.window_start(seq_len, window)
        dropped = min(start, n_q)
        return n_q - dropped, n_fp - (start - dropped)

    def window_start(self, length: int, window: int) -> int:
        """Position of the oldest token a sliding-window layer keeps at ``length`` tokens: the last
        ``window - 1`` tokens, as transformers' ``DynamicSlidingWindowLayer``, but dropped only in whole
        key groups for per-channel (KIVI) keys."""
        unit = self.k.flush_unit("key") if self.k.granularity("key") == "per_channel" else 1
        return max(0, (length - window + 1) // unit * unit)

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k.to_dict(), "v": self.v.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str = "LayerSpec") -> LayerSpec:
        if not isinstance(data, Mapping) or "k" not in data or "v" not in data:
            _fail(where, data, "an object with 'k' and 'v' specs")
        return cls(QuantSpec.from_dict(data["k"], f"{where}.k"), QuantSpec.from_dict(data["v"], f"{where}.v"))

    @classmethod
    def pair(cls, k_bits: int, v_bits: int, mode: str = "kivi", group_size: int | None = None,
             residual_length: int | None = None, rotation: bool = False, sink_length: int = 0) -> LayerSpec:
        """``rotation`` rotates both tensors (16-bit ones never are); ``sink_length`` applies to both."""
        return cls(QuantSpec(k_bits, mode, group_size, residual_length, rotation, sink_length),
                   QuantSpec(v_bits, mode, group_size, residual_length, rotation, sink_length))


@dataclass(frozen=True)
class ModelDims:
    """The attention shape of a model, read from its transformers config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_type: str = ""
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        if isinstance(config, ModelDims):
            return config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = getattr(text, "num_hidden_layers", None)
        n_heads = getattr(text, "num_attention_heads", None)
        if not _is_int(n_layers) or not _is_int(n_heads):
            raise PlanError(f"config of type {type(config).__name__} has no num_hidden_layers/num_attention_heads;"
                            " allowed: a transformers decoder config")
        n_kv = getattr(text, "num_key_value_heads", None) or n_heads
        head_dim = getattr(text, "head_dim", None) or getattr(text, "hidden_size") // n_heads
        window = getattr(text, "sliding_window", None)
        types = getattr(text, "layer_types", None)
        if types is None:
            types = ["sliding_attention" if window else "full_attention"] * n_layers
        return cls(n_layers, int(n_kv), int(head_dim), str(getattr(text, "model_type", "")), tuple(types),
                   window)

    def fingerprint(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "model_type": self.model_type}


@dataclass(frozen=True)
class KVPlan:
    """Per-layer K/V precision for one model: the artefact search writes and the cache reads.

    Example:
        >>> plan = KVPlan.uniform(30, 4, 2, mode="kivi")
        >>> plan.equivalent_bits
        3.0
    """

    layers: tuple[LayerSpec, ...]
    model_id: str | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    model: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    # queries' second moments for query-aware key rounding (kvtuner.rounding); None: nearest rounding
    key_rounding: Any = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        from .rounding import KeyRounding

        if self.key_rounding is not None and not isinstance(self.key_rounding, KeyRounding):
            _fail("KVPlan.key_rounding", type(self.key_rounding).__name__, "a kvtuner.rounding.KeyRounding or None")
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        if not isinstance(layers, tuple) or not layers:
            _fail("KVPlan.layers", self.layers, "a non-empty list of LayerSpec")
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerSpec):
                _fail(f"KVPlan.layers[{i}]", layer, "a LayerSpec")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "provenance", dict(self.provenance or {}))
        if self.key_rounding is not None and self.key_rounding.num_layers != len(layers):
            _fail("KVPlan.key_rounding", f"{self.key_rounding.num_layers} layers", f"{len(layers)} (the plan's layers)")

    def with_key_rounding(self, key_rounding: Any) -> KVPlan:
        """This plan with query-aware key rounding (a :class:`kvtuner.rounding.KeyRounding`, or None)."""
        return KVPlan(self.layers, self.model_id, self.provenance, self.model, key_rounding)

    # ------------------------------------------------------------------ construction
    @classmethod
    def uniform(cls, num_layers: int, k_bits: int, v_bits: int, mode: str = "kivi", *,
                group_size: int | None = None, residual_length: int | None = None,
                model_id: str | None = None, rotation: bool = False, sink_length: int = 0) -> KVPlan:
        """The same (k_bits, v_bits) pair in every layer."""
        if not _is_int(num_layers) or num_layers < 1:
            _fail("KVPlan.uniform.num_layers", num_layers, "a positive integer")
        layer = LayerSpec.pair(k_bits, v_bits, mode, group_size, residual_length, rotation, sink_length)
        return cls((layer,) * num_layers, model_id=model_id,
                   provenance={"source": f"uniform {layer.name} {mode}"})

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[int, int]], mode: str = "kivi", *, group_size: int | None = None,
                   residual_length: int | None = None, model_id: str | None = None,
                   provenance: Mapping[str, Any] | None = None, rotation: bool = False,
                   sink_length: int = 0) -> KVPlan:
        """One (k_bits, v_bits) pair per layer, all in one mode."""
        layers = tuple(LayerSpec.pair(k, v, mode, group_size, residual_length, rotation, sink_length)
                       for k, v in pairs)
        return cls(layers, model_id=model_id, provenance=provenance or {})

    # ------------------------------------------------------------------ derived numbers
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def equivalent_bits(self) -> float:
        """Mean over layers of (k_bits + v_bits) / 2, as in the paper (ignores metadata and residual)."""
        return sum(layer.equivalent_bits for layer in self.layers) / self.num_layers

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(layer.k.bits, layer.v.bits) for layer in self.layers]

    def bytes_per_token(self, config: Any, dtype_bytes: int = 2) -> float:
        """Steady-state cache bytes added per token (all layers, K and V, all KV heads, batch 1).

        Counts packed codes plus scales and zeros; the residual window is a fixed cost, so it does
        not appear per token (see :meth:`expected_nbytes` for the exact total at a given length).
        """
        dims = self.check_config(config)
        per_head = sum(layer.k.bytes_per_token("key", dims.head_dim, dtype_bytes)
                       + layer.v.bytes_per_token("value", dims.head_dim, dtype_bytes) for layer in self.layers)
        return per_head * dims.num_kv_heads

    def expected_nbytes(self, config: Any, seq_len: int, batch_size: int = 1, dtype_bytes: int = 2) -> int:
        """Analytical cache size after a prefill of ``seq_len`` tokens: codes + scales/zeros + residual.

        This is computed from the storage rules alone (``QuantSpec.split``), independently of the
        cache implementation, so tests can hold :meth:`MixedPrecisionCache.nbytes` against it. A
        sliding-window layer counts what it holds: the newest tokens of its window, its oldest ones
        dropped in whole key groups (KIVI), no sink tokens.
        """
        dims = self.check_config(config)
        total = 0
        for layer, kind in zip(self.layers, dims.layer_types):
            window = dims.sliding_window if kind == "sliding_attention" else None
            for spec, role in ((layer.k, "key"), (layer.v, "value")):
                n_q, n_fp = layer.held_tokens(spec, role, seq_len, window)
                total += spec.quantized_bytes(role, n_q, dims.head_dim, dtype_bytes)
                total += n_fp * dims.head_dim * dtype_bytes
        return total * dims.num_kv_heads * batch_size

    # ------------------------------------------------------------------ validation
    def check_config(self, config: Any) -> ModelDims:
        """Raise :class:`PlanError` unless this plan fits ``config``; return the model's dims."""
        dims = ModelDims.from_config(config)
        if dims.num_layers != self.num_layers:
            raise PlanError(f"plan.num_layers={self.num_layers} does not match the model; allowed: "
                            f"{dims.num_layers} (config.num_hidden_layers)")
        if self.model:
            for key in ("num_kv_heads", "head_dim"):
                if key in self.model and self.model[key] != getattr(dims, key):
                    raise PlanError(f"plan.model.{key}={self.model[key]} does not match the model; allowed: "
                                    f"{getattr(dims, key)}")
        for i, layer in enumerate(self.layers):
            for name, spec in (("k", layer.k), ("v", layer.v)):
                # kivi values clamp their channel group to head_dim; an explicit per_token group may not
                if (spec.quantized and spec.mode == "per_token" and spec.group_size is not None
                        and spec.group_size > dims.head_dim):
                    raise PlanError(f"plan.layers[{i}].{name}.group_size={spec.group_size} exceeds the model's "
                                    f"head_dim; allowed: 1..{dims.head_dim} or null")
        for i, kind in enumerate(dims.layer_types):
            if kind not in ("full_attention", "sliding_attention"):
                raise PlanError(f"model layer {i} has type {kind!r}; allowed: 'full_attention' or "
                                "'sliding_attention'")
        kr = self.key_rounding
        if kr is not None and (kr.num_kv_heads, kr.head_dim) != (dims.num_kv_heads, dims.head_dim):
            raise PlanError(f"plan.key_rounding is for {kr.num_kv_heads} KV heads of head_dim {kr.head_dim}; "
                            f"allowed: the model's {dims.num_kv_heads} and {dims.head_dim}")
        return dims

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        from ._version import __version__

        provenance = {"kvtuner_version": __version__, **self.provenance}
        out = {"_type": "KVPlan", "_version": PLAN_VERSION if self.key_rounding is not None else 1,
               "model_id": self.model_id, "num_layers": self.num_layers, "equivalent_bits": self.equivalent_bits,
               "model": dict(self.model) if self.model else None,
               "layers": [layer.to_dict() for layer in self.layers], "provenance": provenance}
        if self.key_rounding is not None:
            out["key_rounding"] = self.key_rounding.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, config: Any = None) -> KVPlan:
        check_header(data, "KVPlan", PLAN_VERSION)
        layers = data.get("layers")
        if not isinstance(layers, list) or not layers:
            _fail("plan.layers", layers, "a non-empty list of {k, v} objects")
        if "num_layers" in data and data["num_layers"] != len(layers):
            _fail("plan.num_layers", data["num_layers"], f"{len(layers)} (the length of plan.layers)")
        model_id = data.get("model_id")
        if model_id is not None and not isinstance(model_id, str):
            _fail("plan.model_id", model_id, "a string or null")
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, Mapping):
            _fail("plan.provenance", provenance, "an object")
        model = data.get("model")
        if model is not None and not isinstance(model, Mapping):
            _fail("plan.model", model, "an object or null")
        rounding = data.get("key_rounding")
        if rounding is not None:
            from .rounding import KeyRounding

            rounding = KeyRounding.from_dict(rounding)
        plan = cls(tuple(LayerSpec.from_dict(layer, f"plan.layers[{i}]") for i, layer in enumerate(layers)),
                   model_id=model_id, provenance=provenance, model=model, key_rounding=rounding)
        if config is not None:
            plan.check_config(config)
        return plan

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON atomically (temp file + rename): a crash never leaves half a file."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str], config: Any = None) -> KVPlan:
        """Read and validate a plan file; with ``config``, also check it against the model."""
        return cls.from_dict(read_json(path), config=config)

    def for_model(self, config: Any, model_id: str | None = None) -> KVPlan:
        """A copy that records the model's shape, so a mismatched model is caught on load."""
        dims = self.check_config(config)
        return KVPlan(self.layers, model_id=model_id or self.model_id, provenance=self.provenance,
                      model=dims.fingerprint(), key_rounding=self.key_rounding)

    def describe(self, config: Any = None) -> str:
        """A per-layer table: layer | pair | K | V."""
        rows = [f"{'layer':>5}  {'pair':<6} {'K':<22} {'V':<22}"]
        for i, layer in enumerate(self.layers):
            def fmt(s: QuantSpec) -> str:
                return "fp16" if not s.quantized else f"{s.bits}b {s.mode} g{s.group_size} r{s.residual_length}"
            rows.append(f"{i:>5}  {layer.name:<6} {fmt(layer.k):<22} {fmt(layer.v):<22}")
        rows.append(f"equivalent bits: {self.equivalent_bits:.3f}")
        if self.key_rounding is not None:
            rows.append("key rounding: query-aware (queries' second moments measured on calibration text)")
        if config is not None:
            rows.append(f"bytes/token (all layers, steady state): {self.bytes_per_token(config):.1f}")
        return "\n".join(rows)


# ---------------------------------------------------------------------- JSON helpers shared by artefacts
def check_header(data: Any, type_name: str, version: int) -> None:
    if not isinstance(data, Mapping):
        _fail(f"{type_name.lower()} file", type(data).__name__, f"a JSON object with _type={type_name!r}")
    if data.get("_type") != type_name:
        _fail("_type", data.get("_type"), repr(type_name))
    v = data.get("_version")
    if not _is_int(v) or v < 1:
        _fail("_version", v, f"an integer 1..{version}")
    if v > version:
        _fail("_version", v, f"1..{version} (the file was written by a newer kvtuner; upgrade it)")


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if p.is_dir():
        raise PlanError(f"{p} is a directory; allowed: a JSON file")
    if not p.is_file():
        raise PlanError(f"{p}: no such file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PlanError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise PlanError(f"{p}: not a UTF-8 text file") from None
    except OSError as e:
        raise PlanError(f"{p}: cannot be read ({e.strerror or type(e).__name__}); allowed: a readable file") from None


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; set it straight back
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"  # serialize first: a bad object must not touch the file
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file 0600; a plain open() would obey the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p
