"""Query-aware rounding of quantized keys.

A key ``k`` enters attention only through the logits ``q . k``, so what its quantization error ``e`` costs
is ``E[(q . e)^2] = e^T H e`` with ``H = E[q q^T]``, the queries' second moment, not ``|e|^2``.
Rounding each key to the nearest code minimises ``|e|^2``; rounding the channels of a key one after the
other and passing each channel's rounding error on to the channels not yet rounded, weighted by ``H``'s
inverse (the optimal-brain-surgeon update that GPTQ uses for weights), minimises ``e^T H e`` far better.

The grid does not change: scales and zeros are the same min/max ones as nearest rounding, only the codes
differ, so every kernel that reads the cache reads these codes unchanged. ``H`` is measured offline per
layer and KV head (the mean over the query heads that share the KV head, post-RoPE, on calibration text)
and travels inside the plan file.

On SmolLM2 with 3-bit keys this halves the attention-output error that key quantization causes on
held-out text (``docs/method.md``).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# relative damping added to H's diagonal before it is inverted: keeps directions that calibration
# queries never used from receiving unbounded corrections
DAMPING = 0.01


@dataclass(frozen=True, eq=False)
class KeyRounding:
    """Queries' second moments ``[layers, kv_heads, head_dim, head_dim]`` (unrotated, fp32).

    ``factor(layer, rotated)`` gives what :func:`round_codes` needs for one layer: the upper Cholesky
    factor of the damped ``H``'s inverse, in the storage's (plain or Hadamard-rotated) basis.
    """

    moments: torch.Tensor
    damping: float = DAMPING
    _factors: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        m = self.moments
        if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[-1] != m.shape[-2] or m.shape[-1] < 1:
            raise ValueError(f"moments shape {tuple(getattr(m, 'shape', ()))} is invalid; allowed: "
                             "[layers, kv_heads, head_dim, head_dim]")
        if not torch.isfinite(m).all():
            raise ValueError("moments hold non-finite values; allowed: finite second moments")
        if not (isinstance(self.damping, float) and self.damping > 0):
            raise ValueError(f"damping={self.damping!r} is invalid; allowed: a float > 0")
        object.__setattr__(self, "moments", m.detach().to("cpu", torch.float32).contiguous())

    @property
    def num_layers(self) -> int:
        return self.moments.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.moments.shape[1]

    @property
    def head_dim(self) -> int:
        return self.moments.shape[-1]

    def factor(self, layer: int, rotated: bool, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[kv_heads, D, D]`` upper-triangular ``U`` with ``U^T U = (H + damping)^-1``, fp32 on ``device``."""
        key = (layer, bool(rotated), str(device))
        if key not in self._factors:
            from .quant import hadamard

            h = self.moments[layer].double()
            d = h.shape[-1]
            if rotated:  # stored keys are k @ R, queries meet them as q @ R: H becomes R^T H R
                r = hadamard(d, dtype=torch.float64)
                h = r.T @ h @ r
            mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
            h = h + self.damping * mean_diag[:, None, None] * torch.eye(d, dtype=h.dtype)
            u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
            self._factors[key] = u.to(device=device, dtype=torch.float32)
        return self._factors[key]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """fp16 upper triangles (the moments are symmetric), each head scaled by its mean diagonal."""
        n, h, d, _ = self.moments.shape
        scale = self.moments.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)  # [n, h]
        iu = torch.triu_indices(d, d)
        tri = (self.moments / scale[..., None, None])[..., iu[0], iu[1]].to(torch.float16)
        return {"kind": "query_second_moments", "shape": [n, h, d, d], "damping": self.damping,
                "scale": scale.tolist(), "upper_fp16": base64.b64encode(tri.numpy().tobytes()).decode("ascii")}

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan.key_rounding") -> KeyRounding:
        from .spec import _fail

        if not isinstance(data, Mapping) or data.get("kind") != "query_second_moments":
            _fail(where, data if not isinstance(data, Mapping) else data.get("kind"),
                  "an object with kind='query_second_moments'")
        shape = data.get("shape")
        if (not isinstance(shape, Sequence) or len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape)
                or shape[2] != shape[3]):
            _fail(f"{where}.shape", shape, "[layers, kv_heads, head_dim, head_dim] of positive integers")
        n, h, d, _ = shape
        try:
            raw = base64.b64decode(data.get("upper_fp16", ""), validate=True)
            scale = torch.tensor(data.get("scale"), dtype=torch.float32)
        except (ValueError, TypeError) as e:
            _fail(f"{where}.upper_fp16/scale", type(e).__name__, "base64 fp16 data and a [layers][heads] scale list")
        m = d * (d + 1) // 2
        if len(raw) != 2 * n * h * m or tuple(scale.shape) != (n, h):
            _fail(f"{where}.upper_fp16", f"{len(raw)} bytes, scale {tuple(scale.shape)}",
                  f"{2 * n * h * m} bytes and scale [{n}][{h}] for shape {shape}")
        tri = torch.frombuffer(bytearray(raw), dtype=torch.float16).float().view(n, h, m)
        iu = torch.triu_indices(d, d)
        full = torch.zeros(n, h, d, d)
        full[..., iu[0], iu[1]] = tri
        full = full + full.transpose(-1, -2) - torch.diag_embed(full.diagonal(dim1=-2, dim2=-1))
        damping = data.get("damping", DAMPING)
        if not isinstance(damping, float) or damping <= 0:
            _fail(f"{where}.damping", damping, "a float > 0")
        try:
            return cls(full * scale[..., None, None], damping)
        except ValueError as e:
            _fail(where, "moments", str(e))


def round_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, factor: torch.Tensor
                ) -> torch.Tensor:
    """Codes for ``x`` ``[B, H, T, D]`` on a fixed grid (``scale``/``zero`` per element, same shape), rounded
    channel by channel with each channel's error passed on to the later ones through ``factor``
    ``[H, D, D]`` (:meth:`KeyRounding.factor`). The reference (specification) of query-aware rounding.
    """
    w = x.float().clone()
    top = 2 ** bits - 1
    codes = torch.empty_like(w)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    diag = factor.diagonal(dim1=-2, dim2=-1)  # [H, D]
    for c in range(w.shape[-1]):
        s, z = scale[..., c], zero[..., c]
        q = torch.where(s > 0, torch.round((w[..., c] - z) / safe[..., c]), torch.zeros_like(s)).clamp_(0, top)
        codes[..., c] = q
        err = (w[..., c] - (q * s + z)) / diag[None, :, None, c]
        w[..., c + 1:] -= err[..., None] * factor[None, :, None, c, c + 1:]
    return codes.to(torch.uint8)


def quantize_keys(x: torch.Tensor, bits: int, granularity: str, group_size: int | None, factor: torch.Tensor, *,
                  triton: bool = False):
    """:func:`kvtuner.quant.quantize` with query-aware codes: the same scales and zeros, the same packing.
    ``triton``: quantize, round and pack in one Triton launch (:mod:`kvtuner.kernels.rounding`)."""
    from . import quant

    if triton:  # the kernel hands shapes it does not cover back to this reference
        from .kernels.rounding import quantize_keys as fused

        return fused(x, bits, granularity, group_size, factor)
    qt = quant.quantize(x, bits, granularity, group_size)
    if x.shape[-2] == 0:
        return qt
    s, z = quant.element_params(qt)
    codes = round_codes(x, s, z, bits, factor.to(x.device))
    return quant.QuantizedTensor(quant.pack(codes, bits), qt.scale, qt.zero, bits, granularity, qt.group_size,
                                 x.shape[-1])


def query_moments(model: Any, batches: list[torch.Tensor]) -> KeyRounding:
    """Mean ``q q^T`` per layer and KV head over the calibration windows (one forward each)."""
    from .profiling import capture_attention
    from .spec import ModelDims

    dims = ModelDims.from_config(model.config)
    sums: list[torch.Tensor | None] = [None] * dims.num_layers
    count = 0
    with torch.no_grad():
        for ids in batches:
            with capture_attention(model) as records:
                model(ids.to(model.device), use_cache=False)
            for layer in range(dims.num_layers):
                q = records[layer]["q"].double()  # [B, Hq, T, D]
                b, hq, t, d = q.shape
                g = q.reshape(b, dims.num_kv_heads, hq // dims.num_kv_heads, t, d).transpose(0, 1).reshape(
                    dims.num_kv_heads, -1, d)
                m = torch.einsum("hnd,hne->hde", g, g).cpu()
                sums[layer] = m if sums[layer] is None else sums[layer] + m
            count += b * (hq // dims.num_kv_heads) * t
            records.clear()
    return KeyRounding(torch.stack(sums) / count)
