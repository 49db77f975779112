"""Decode attention over a packed cache layer: the PyTorch reference and the transformers plug-in.

:func:`decode_attention` is the specification of the fused GPU kernel
(``kvtuner.kernels.decode_attention`` has the same signature): one new query token per sequence attends to
the quantized history (packed codes + scales/zeros) followed by the full-precision residual window.

The plug-in is a transformers attention function registered as ``"kvtuner"``. During decode on a
CUDA device a :class:`~kvtuner.cache.QuantizedKVLayer` returns *handles* instead of dequantized
tensors; the ``"kvtuner"`` function recognises them and runs the fused kernel. Everything else
(prefill, CPU, layers the kernel does not cover) goes to SDPA unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from . import quant

ATTN_NAME = "kvtuner"


def decode_attention(q: torch.Tensor, k_packed: quant.QuantizedTensor | None, k_residual: torch.Tensor | None,
                     v_packed: quant.QuantizedTensor | None, v_residual: torch.Tensor | None, scaling: float,
                     kv_mask: torch.Tensor | None = None, out_scale: float = 1.0, *,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q`` ``[B, Hq, 1, D]`` over stored keys/values, computed in fp32.

    Keys and values are the packed history (``None`` when empty) followed by the residual
    (``[B, Hkv, R, D]``, ``None`` when empty); ``Hq`` is a multiple of ``Hkv`` (GQA/MQA).
    ``kv_mask`` is ``[B, L]`` bool, True where a stored token may be attended. The output is
    multiplied by ``out_scale`` (rotated layers fold their 1/sqrt(D) there).

    ``lengths`` (static buffers, as in CUDA-graph replay): int32 ``[quantized tokens / unit,
    residual tokens]`` with ``unit`` the key group for per-channel keys (else 1); the packed and
    residual tensors are then whole buffers of which only that many tokens count, and ``kv_mask``
    is indexed by absolute position (it may be longer than the stored tokens).

    Returns ``[B, 1, Hq, D]`` in ``q.dtype`` (the layout transformers attention functions return).
    """
    if lengths is not None:
        k_packed, k_residual, v_packed, v_residual, kv_mask = counted(lengths, k_packed, k_residual, v_packed,
                                                                      v_residual, kv_mask)
    k = quant.materialize(k_packed, k_residual, torch.float32)
    v = quant.materialize(v_packed, v_residual, torch.float32)
    b, hq, _, d = q.shape
    rep = hq // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scaling  # [B, Hq, 1, L]
    if kv_mask is not None:
        scores = scores.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ v) * out_scale
    return out.transpose(1, 2).to(q.dtype)


def counted(lengths: torch.Tensor, k_packed: quant.QuantizedTensor, k_residual: torch.Tensor,
            v_packed: quant.QuantizedTensor, v_residual: torch.Tensor, kv_mask: torch.Tensor | None) -> tuple:
    """The filled parts of static buffers, from ``lengths`` (see :func:`decode_attention`)."""
    n_units, n_r = (int(x) for x in lengths.tolist())
    n_q = n_units * quant.length_unit(k_packed)

    def part(p: quant.QuantizedTensor) -> quant.QuantizedTensor | None:
        return quant.slice_tokens(p, 0, n_q) if n_q else None

    mask = None if kv_mask is None else kv_mask[:, : n_q + n_r].bool()
    return part(k_packed), k_residual[..., :n_r, :], part(v_packed), v_residual[..., :n_r, :], mask


def rotated_decode(decode: Any, q: torch.Tensor, k_packed: quant.QuantizedTensor | None,
                   k_residual: torch.Tensor | None, v_packed: quant.QuantizedTensor | None,
                   v_residual: torch.Tensor | None, scaling: float, kv_mask: torch.Tensor | None,
                   k_rotation: bool, v_rotation: bool, **kwargs: Any) -> torch.Tensor:
    """``decode`` (this reference or the kernel) over stores whose packed history holds ``k H`` and/or
    ``v H`` while their residual window holds plain tokens.

    Rotation is paid where tokens are quantized, once per flush unit, not at every step's write. The
    packed splits run in rotated space: ``(q H).(k H) = q.k`` and ``sum p (v H) = o H``. The query takes
    one matmul with the exact ``±1`` matrix ``S = sqrt(D) H`` (its ``1/sqrt(D)`` in the softmax scale),
    and the kernel (``fuses_rotation``) rotates the packed share of its output back in the merge kernel
    (``rotate_out``, ``1/sqrt(D)`` in ``out_scale``); the residual split reads the plain query. The query
    keeps its matmul: transforming it inside the split kernel (``rotate_q``) made the register-capped
    pairs 7-16 % slower on an H100. Any other ``decode`` (the reference) gets the packed history
    dequantized and rotated back, in fp32, as part of a plain residual.
    """
    d = q.shape[-1]
    if getattr(decode, "fuses_rotation", False):
        qp = q @ quant.hadamard(d, q.device, q.dtype, normalized=False) if k_rotation else q
        return decode(qp, k_packed, k_residual, v_packed, v_residual, scaling / d ** 0.5 if k_rotation else scaling,
                      kv_mask, out_scale=d ** -0.5 if v_rotation else 1.0, rotate_out=v_rotation,
                      q_residual=q if k_rotation else None, scaling_residual=scaling, **kwargs)
    if not (k_rotation or v_rotation):
        return decode(q, k_packed, k_residual, v_packed, v_residual, scaling, kv_mask, **kwargs)
    lengths = kwargs.pop("lengths", None)
    if lengths is not None:
        k_packed, k_residual, v_packed, v_residual, kv_mask = counted(lengths, k_packed, k_residual, v_packed,
                                                                      v_residual, kv_mask)
    k = quant.materialize(k_packed, k_residual, torch.float32, k_rotation)
    v = quant.materialize(v_packed, v_residual, torch.float32, v_rotation)
    return decode(q, None, k, None, v, scaling, kv_mask, **kwargs)


class PackedKV(torch.Tensor):
    """A zero-size stand-in that the cache returns instead of dequantized keys/values.

    It carries the layer so the ``"kvtuner"`` attention function can read the packed storage;
    any other attention function would fail loudly on its shape, never silently.
    """

    layer: Any

    @staticmethod
    def wrap(layer: Any, like: torch.Tensor) -> PackedKV:
        t = like.new_empty(0).as_subclass(PackedKV)
        t.layer = layer
        return t


def kvtuner_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: fused decode over packed handles, SDPA otherwise."""
    if isinstance(key, PackedKV):
        layer = key.layer
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return layer.fused_decode(query, scale, _kv_mask(attention_mask, layer)), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _kv_mask(attention_mask: torch.Tensor | None, layer: Any) -> torch.Tensor | None:
    """The last query row of the model's mask as ``[B, L]`` bool, True where attended (None without a mask)."""
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, :]
    if row.dtype != torch.bool:
        row = row == 0  # additive float mask: 0 where allowed
    n = layer.stored_tokens()
    return row[:, -n:].contiguous()  # no .all() check: it would sync the GPU every step


def register() -> str:
    """Register the ``"kvtuner"`` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, kvtuner_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
