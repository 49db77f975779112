"""Per-layer sensitivity of a model to low-bit keys and values (KVTuner §4, App. B).

One forward pass per calibration sequence captures every layer's post-RoPE queries, keys and
values through a registered transformers attention function (no hooks on model internals, no
patching). Then, per layer, mode and (k_bits, v_bits) pair, cheap offline maths measures the
relative error of that layer's attention output when K and V go through the cache's own
storage rules (``cache.simulate_cache``):

    e_o = ||attn(q, K_hat, V_hat) - attn(q, K, V)|| / ||attn(q, K, V)||

Each layer sees its own full-precision inputs, so errors do not accumulate across layers. The
queries scored are the second half of each sequence (positions with a long quantized history,
as in decoding). Key-only (V kept at 16 bits) and value-only errors are recorded as well.

Optionally (``kl_pairs``), the end-to-end signal: the KL divergence of the next-token
distribution when only one layer is quantized, through the real :class:`MixedPrecisionCache`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .models import with_cache
from .spec import (
    BITS,
    MODES,
    QUANTIZED_BITS,
    KVPlan,
    LayerSpec,
    ModelDims,
    PlanError,
    QuantSpec,
    _fail,
    atomic_write_json,
    check_header,
    read_json,
)

ALL_PAIRS = tuple((k, v) for k in (8, 4, 2) for v in (8, 4, 2))
TABLE_VERSION = 1
_CAPTURE = "kvtuner_capture"


# ---------------------------------------------------------------------- capture
@contextmanager
def capture_attention(model: Any) -> Iterator[dict[int, dict[str, Any]]]:
    """Record each attention layer's (q, k, v, scaling, sliding_window) while the block runs.

    Uses transformers' AttentionInterface: a registered function records its inputs and then runs
    the standard SDPA attention. The model's previous attention implementation is restored on exit,
    also when the block raises.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    records: dict[int, dict[str, Any]] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        records[module.layer_idx] = {"q": query.detach(), "k": key.detach(), "v": value.detach(),
                                     "scaling": kwargs.get("scaling") or query.shape[-1] ** -0.5,
                                     "sliding_window": kwargs.get("sliding_window")}
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE, capture)
    AttentionMaskInterface.register(_CAPTURE, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE)
    try:
        yield records
    finally:
        model.set_attn_implementation(previous)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, first_query: int,
               window: int | None) -> torch.Tensor:
    """Causal attention output (fp32) of queries ``first_query..T-1`` over all T keys; GQA aware."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    q = q[..., first_query:, :].float()
    scores = (q @ k.transpose(-1, -2)) * scaling
    qpos = torch.arange(first_query, first_query + q.shape[-2], device=q.device).unsqueeze(1)
    kpos = torch.arange(k.shape[-2], device=q.device).unsqueeze(0)
    visible = kpos <= qpos
    if window:
        visible &= kpos > qpos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------- the table
@dataclass
class SensitivityTable:
    """Per-layer attention-output errors for every mode and (k_bits, v_bits) pair.

    ``output_error[mode][layer][i]`` belongs to ``pairs[i]``; ``key_error[mode][layer][j]`` and
    ``value_error[mode][layer][j]`` to ``bits[j]`` with the other tensor at 16 bits.
    ``kl[mode][f"K{k}V{v}"][layer]`` is present when end-to-end KL was measured.
    """

    model_id: str | None
    model: dict[str, Any]
    text_sha256: str
    num_tokens: int
    seq_len: int
    modes: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]
    bits: tuple[int, ...]
    output_error: dict[str, list[list[float]]]
    key_error: dict[str, list[list[float]]]
    value_error: dict[str, list[list[float]]]
    kl: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    rotation: bool = False  # every quantized tensor was Hadamard-rotated (QuantSpec.rotation)
    sink_length: int = 0  # full-precision sink tokens of every quantized tensor (QuantSpec.sink_length)

    @property
    def num_layers(self) -> int:
        return self.model["num_layers"]

    def error(self, mode: str, layer: int, pair: tuple[int, int]) -> float:
        return self.output_error[mode][layer][self.pairs.index(tuple(pair))]

    def check_config(self, config: Any) -> None:
        dims = ModelDims.from_config(config)
        for key in ("num_layers", "num_kv_heads", "head_dim"):
            if self.model.get(key) != getattr(dims, key):
                raise PlanError(f"table.model.{key}={self.model.get(key)} does not match the model; allowed: "
                                f"{getattr(dims, key)} (the table was profiled on another model)")

    def to_dict(self) -> dict[str, Any]:
        from ._version import __version__

        return {"_type": "SensitivityTable", "_version": TABLE_VERSION, "kvtuner_version": __version__,
                "model_id": self.model_id, "model": self.model, "text_sha256": self.text_sha256,
                "num_tokens": self.num_tokens, "seq_len": self.seq_len, "modes": list(self.modes),
                "pairs": [list(p) for p in self.pairs], "bits": list(self.bits),
                "output_error": self.output_error, "key_error": self.key_error, "value_error": self.value_error,
                "kl": self.kl, "rotation": self.rotation, "sink_length": self.sink_length}

    @classmethod
    def from_dict(cls, data: Any, config: Any = None) -> SensitivityTable:
        check_header(data, "SensitivityTable", TABLE_VERSION)
        for key in ("model", "modes", "pairs", "bits", "output_error", "key_error", "value_error", "text_sha256"):
            if key not in data:
                _fail(f"table.{key}", None, "present (the field is required)")
        model = data["model"]
        if not isinstance(model, dict) or not isinstance(model.get("num_layers"), int) or model["num_layers"] < 1:
            _fail("table.model", model, "an object with num_layers, num_kv_heads, head_dim")
        n = model["num_layers"]
        modes = tuple(data["modes"])
        for m in modes:
            if m not in MODES:
                _fail("table.modes", m, " or ".join(MODES))
        pairs = tuple(tuple(p) for p in data["pairs"])
        for p in pairs:
            if len(p) != 2 or any(b not in BITS for b in p):
                _fail("table.pairs", list(p), f"[k_bits, v_bits] with bits in {', '.join(map(str, BITS))}")
        bits = tuple(data["bits"])
        for name, width in (("output_error", len(pairs)), ("key_error", len(bits)), ("value_error", len(bits))):
            block = data[name]
            if not isinstance(block, dict) or set(block) != set(modes):
                _fail(f"table.{name}", sorted(block) if isinstance(block, dict) else block, f"one entry per mode {modes}")
            for m in modes:
                rows = block[m]
                if not isinstance(rows, list) or len(rows) != n:
                    _fail(f"table.{name}.{m}", f"{len(rows) if isinstance(rows, list) else rows} rows",
                          f"{n} rows (one per layer)")
                for i, row in enumerate(rows):
                    if (not isinstance(row, list) or len(row) != width
                            or not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in row)):
                        _fail(f"table.{name}.{m}[{i}]", row, f"{width} finite non-negative numbers")
        kl = data.get("kl") or {}
        if not isinstance(kl, dict) or not set(kl) <= set(modes):
            _fail("table.kl", kl if not isinstance(kl, dict) else sorted(kl), f"an object keyed by modes {modes}")
        for m, by_pair in kl.items():
            for name, row in (by_pair.items() if isinstance(by_pair, dict) else [(None, by_pair)]):
                if (name is None or not isinstance(row, list) or len(row) != n
                        or not all(x is None or (isinstance(x, (int, float)) and math.isfinite(x) and x >= 0)
                                   for x in row)):
                    _fail(f"table.kl.{m}" + (f".{name}" if name else ""), row,
                          f"{n} finite non-negative numbers or null (not measured), one per layer")
        table = cls(data.get("model_id"), model, data["text_sha256"], int(data.get("num_tokens", 0)),
                    int(data.get("seq_len", 0)), modes, pairs, bits, data["output_error"], data["key_error"],
                    data["value_error"], kl, bool(data.get("rotation", False)),
                    _sink_of(data))
        if config is not None:
            table.check_config(config)
        return table

    def save(self, path: str | os.PathLike[str]):
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str], config: Any = None) -> SensitivityTable:
        return cls.from_dict(read_json(path), config=config)


# ---------------------------------------------------------------------- profiling
def calibration_batches(tokenizer: Any, texts: str | Sequence[str], num_sequences: int, seq_len: int
                        ) -> list[torch.Tensor]:
    """``num_sequences`` disjoint ``[1, seq_len]`` token windows from ``texts`` (joined)."""
    text = texts if isinstance(texts, str) else "\n\n".join(texts)
    if not text.strip():
        raise ValueError("calibration text is empty; allowed: non-empty text")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    need = num_sequences * seq_len
    if len(ids) < seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens; allowed: at least seq_len={seq_len}")
    if len(ids) < need:
        num_sequences = len(ids) // seq_len
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(num_sequences)]


@torch.no_grad()
def profile(model: Any, tokenizer: Any, texts: str | Sequence[str], *, pairs: Sequence[tuple[int, int]] = ALL_PAIRS,
            modes: Sequence[str] = MODES, num_sequences: int = 8, seq_len: int = 512,
            kl_pairs: Sequence[tuple[int, int]] = (), kl_sequences: int | None = None,
            model_id: str | None = None, rotation: bool = False, sink_length: int = 0,
            progress: bool = True, key_rounding: Any = None) -> SensitivityTable:
    """Measure every layer's sensitivity; see the module docstring.

    Args:
        texts: calibration text (one string or several, joined).
        pairs: (k_bits, v_bits) candidates; default all nine of {2, 4, 8}^2.
        modes: ``"kivi"`` and/or ``"per_token"`` (default group sizes and residual windows).
        num_sequences, seq_len: calibration windows; ``seq_len`` must exceed one key group plus the
            residual window, or nothing would be quantized.
        kl_pairs: pairs for the optional end-to-end KL of quantizing one layer alone (one forward
            per sequence, layer, pair and mode: off by default). The search uses these KL values
            as per-layer costs when they cover every pair (``build_space(metric="auto")``).
        kl_sequences: how many of the calibration windows the KL runs use (default all); KL costs
            one full forward per window, layer, pair and mode.
        rotation: profile Hadamard-rotated storage (``QuantSpec.rotation``); plans searched from
            this table are rotated too.
        sink_length: full-precision attention-sink tokens (``QuantSpec.sink_length``); plans
            searched from this table keep them too.
        key_rounding: a :class:`kvtuner.rounding.KeyRounding`: keys get query-aware codes, as in plans
            that carry it (the KL runs too).
    """
    from tqdm.auto import tqdm

    dims = ModelDims.from_config(model.config)
    pairs = tuple(tuple(p) for p in pairs)
    for m in modes:
        if m not in MODES:
            raise PlanError(f"mode={m!r} is invalid; allowed: {' or '.join(MODES)}")
    for p in (*pairs, *kl_pairs):
        QuantSpec(p[0]), QuantSpec(p[1])  # validates bits
    sink_spec = QuantSpec(2, sink_length=sink_length)  # validates the sink
    for m in modes:
        probe = QuantSpec(2, m, sink_length=sink_length)
        n_q, _ = probe.split("key", seq_len)
        if n_q == 0:
            raise ValueError(f"seq_len={seq_len} leaves nothing quantized in mode {m!r}; allowed: > "
                             f"{probe.sink_length + probe.residual_length + probe.flush_unit('key')}")
    batches = calibration_batches(tokenizer, texts, num_sequences, seq_len)
    bits = tuple(sorted({b for p in pairs for b in p if b < 16} | set(QUANTIZED_BITS), reverse=True))
    L = dims.num_layers
    sums = {name: {m: torch.zeros(L, width, dtype=torch.float64) for m in modes}
            for name, width in (("output_error", len(pairs)), ("key_error", len(bits)),
                                ("value_error", len(bits)))}
    first_query = seq_len // 2
    bar = tqdm(total=len(batches) * L, desc="profiling layers", disable=not progress, unit="layer")
    for ids in batches:
        with capture_attention(model) as records:
            model(ids.to(model.device), use_cache=False)
        for layer in range(L):
            rec = records[layer]
            q, k, v, scale, win = rec["q"], rec["k"], rec["v"], rec["scaling"], rec["sliding_window"]
            ref = _attention(q, k, v, scale, first_query, win)
            sink = sink_spec.kept_sink(sliding=bool(win))  # the cache's rule
            for m in modes:
                rounding = None if key_rounding is None else (key_rounding, layer)
                k_hat = {b: _simulate(k, b, m, "key", rotation, sink, rounding) for b in bits}
                v_hat = {b: _simulate(v, b, m, "value", rotation, sink) for b in bits}
                for j, b in enumerate(bits):
                    sums["key_error"][m][layer, j] += _rel(_attention(q, k_hat[b], v, scale, first_query, win), ref)
                    sums["value_error"][m][layer, j] += _rel(_attention(q, k, v_hat[b], scale, first_query, win),
                                                             ref)
                for i, (kb, vb) in enumerate(pairs):
                    kk = k if kb == 16 else k_hat[kb]
                    vv = v if vb == 16 else v_hat[vb]
                    sums["output_error"][m][layer, i] += _rel(_attention(q, kk, vv, scale, first_query, win), ref)
            bar.update(1)
        records.clear()
    bar.close()
    n = len(batches)
    table = SensitivityTable(
        model_id=model_id or getattr(model, "kvtuner_model_id", None), model=dims.fingerprint(),
        text_sha256=hashlib.sha256(torch.cat(batches, 1).numpy().tobytes()).hexdigest(),
        num_tokens=n * seq_len, seq_len=seq_len, modes=tuple(modes), pairs=pairs, bits=bits,
        **{name: {m: (block[m] / n).tolist() for m in modes} for name, block in sums.items()}, rotation=rotation,
        sink_length=sink_length)
    if kl_pairs:
        table.kl = layer_kl(model, batches[: kl_sequences or len(batches)], kl_pairs, modes, rotation=rotation,
                            sink_length=sink_length, progress=progress, key_rounding=key_rounding)
    return table


def _sink_of(data: Mapping[str, Any]) -> int:
    sink = data.get("sink_length", 0)
    if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
        _fail("table.sink_length", sink, "a non-negative integer")
    return sink


def _simulate(x: torch.Tensor, bits: int, mode: str, role: str, rotation: bool = False,
              sink_length: int = 0, rounding: tuple[Any, int] | None = None) -> torch.Tensor:
    from .cache import simulate_cache

    return simulate_cache(x, QuantSpec(bits, mode, rotation=rotation, sink_length=sink_length), role,
                          rounding=rounding)


@torch.no_grad()
def layer_kl(model: Any, batches: list[torch.Tensor], pairs: Sequence[tuple[int, int]], modes: Sequence[str], *,
             rotation: bool = False, sink_length: int = 0, progress: bool = True,
             only: Sequence[Collection[tuple[int, int]]] | None = None, key_rounding: Any = None
             ) -> dict[str, dict[str, list[float | None]]]:
    """KL(full || quantized) of next-token distributions when only one layer uses a pair (keyed by
    the pair's unrotated name, ``K4V2``, whatever ``rotation``).

    ``only[layer]``: the pairs worth measuring in that layer (e.g. its Pareto set by attention
    error); the others are recorded as ``None`` and cost no forward pass. Equal-length batches
    run side by side.
    """
    from tqdm.auto import tqdm

    from .evaluation import kl_sum, make_cache, side_by_side

    L = ModelDims.from_config(model.config).num_layers
    if only is not None and len(only) != L:
        raise ValueError(f"only has {len(only)} entries; allowed: one collection of pairs per layer ({L})")
    batch = side_by_side(batches)
    full = [torch.log_softmax(model(ids.to(model.device)).logits.float(), -1) for ids in batch]
    tokens = sum(ids.shape[0] * ids.shape[1] for ids in batch)
    allowed = None if only is None else [{tuple(p[:2]) for p in pairs_here} for pairs_here in only]
    todo = [(kb, vb, layer) for kb, vb in pairs for layer in range(L)
            if allowed is None or (kb, vb) in allowed[layer]]
    out: dict[str, dict[str, list[float | None]]] = {m: {} for m in modes}
    bar = tqdm(total=len(modes) * len(todo), desc="one-layer KL" + (" (rotated)" if rotation else ""),
               disable=not progress, unit="run")
    for m in modes:
        values = {LayerSpec.pair(kb, vb).name: [None] * L for kb, vb in pairs}
        for kb, vb, layer in todo:
            specs = [LayerSpec.pair(16, 16, m)] * L
            specs[layer] = LayerSpec.pair(kb, vb, m, rotation=rotation, sink_length=sink_length)
            plan = KVPlan(tuple(specs), key_rounding=key_rounding)
            kl = 0.0
            for ids, ref in zip(batch, full):
                logp = torch.log_softmax(
                    model(ids.to(model.device), **with_cache(model, make_cache(model, plan))).logits.float(), -1)
                kl += kl_sum(ref.flatten(0, 1), logp.flatten(0, 1))
            values[LayerSpec.pair(kb, vb).name][layer] = max(0.0, kl / tokens)  # rounding can dip below 0
            bar.update(1)
        out[m] = values
    bar.close()
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import numpy as np

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = x.argsort(kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # average tied ranks
            tie = x == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def head_errors(model: Any, batches: list[torch.Tensor], pairs: Sequence[tuple[int, int]], mode: str = "kivi", *,
                rotation: bool = False) -> torch.Tensor:
    """Relative attention-output error of every KV head, ``[layers, kv_heads, len(pairs)]``.

    The error of a KV head is measured over the query heads that read it (its GQA group), the
    second half of each batch's queries, averaged over ``batches``: how much the heads of one layer
    differ tells whether per-head bits could pay off.
    """
    if mode not in MODES:
        _fail("mode", mode, ", ".join(MODES))
    for kb, vb in pairs:
        QuantSpec(kb), QuantSpec(vb)  # validates bits
    out = None
    for ids in batches:
        first_query = ids.shape[-1] // 2
        with capture_attention(model) as records:
            model(ids.to(model.device), use_cache=False)
        layers = sorted(records)
        if out is None:
            out = torch.zeros(len(layers), records[layers[0]]["k"].shape[1], len(pairs))
        for li in layers:
            rec = records[li]
            q, k, v, scale, win = rec["q"], rec["k"], rec["v"], rec["scaling"], rec["sliding_window"]
            ref = _attention(q, k, v, scale, first_query, win)
            hkv, group = k.shape[1], q.shape[1] // k.shape[1]
            for i, (kb, vb) in enumerate(pairs):
                kk = k if kb == 16 else _simulate(k, kb, mode, "key", rotation)
                vv = v if vb == 16 else _simulate(v, vb, mode, "value", rotation)
                got = _attention(q, kk, vv, scale, first_query, win)
                for h in range(hkv):
                    sl = slice(h * group, (h + 1) * group)
                    out[li, h, i] += _rel(got[:, sl], ref[:, sl])
        records.clear()
    return out / len(batches)
