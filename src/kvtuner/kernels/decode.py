"""The Python entry point of the fused decode attention: validates the packed cache, chooses the launch
(:mod:`.launch_config`) and runs the two kernels (:mod:`.decode_kernel`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..quant import PLANES, QuantizedTensor, length_unit
from .decode_kernel import merge_kernel, split_kernel
from .launch_config import FOLDS, UNPACK3, Target, default_block_n, launch_choices, pow2, programs_per_sm, split_count
from .launcher import CachedLauncher

LOG2E = 1.4426950408889634

# the two kernels run once per layer and decode step: skip Triton's per-call re-specialisation
split_launcher = CachedLauncher(split_kernel)
merge_launcher = CachedLauncher(merge_kernel)
_PLACEHOLDERS: dict = {}


def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element stand-in for pointer arguments the launch does not read (kept, not reallocated)."""
    key = (device, dtype)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.empty(1, device=device, dtype=dtype)
    return _PLACEHOLDERS[key]


class Launch(NamedTuple):
    """Grids, runtime arguments (by position) and constexprs/options (by keyword) of the split and merge
    kernels, and the output tensor the merge writes."""

    split_grid: tuple
    split_args: tuple
    split_kwargs: dict
    merge_grid: tuple
    merge_args: tuple
    merge_kwargs: dict
    out: torch.Tensor


def decode_attention(q: torch.Tensor, k_packed: QuantizedTensor | None, k_residual: torch.Tensor | None,
                     v_packed: QuantizedTensor | None, v_residual: torch.Tensor | None, scaling: float,
                     kv_mask: torch.Tensor | None = None, out_scale: float = 1.0, *, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None, swap_qk: bool | None = None,
                     swap_pv: bool | None = None, asm: bool | None = None, fold_k: str | None = None,
                     fold_v: str | None = None, maxnreg: int | None = None,
                     splits_per_sm: int | None = None, unpack3_k: str | None = None, unpack3_v: str | None = None,
                     lengths: torch.Tensor | None = None, rotate_q: bool = False,
                     rotate_out: bool = False, dq16: bool | None = None, q_residual: torch.Tensor | None = None,
                     scaling_residual: float | None = None, launch_info: dict | None = None) -> torch.Tensor:
    """Fused kernel; see :func:`kvtuner.attention.decode_attention` for the contract.

    Keys and values must be in step (same quantized token count), as in every plan whose key and
    value specs share mode, group and residual window. The keyword-only arguments override the
    launch choices (tile, warps, stages, MMA orientation, PTX unpacking, how scales reach the dots,
    register cap, split count, fp16 or fp32 dequantization of multi-group tiles: ``dq16``) for
    benchmarks; ``None`` takes the measured default
    (:func:`launch_defaults`).

    ``lengths`` (CUDA-graph replay): an int32/int64 device tensor ``[quantized tokens / unit, residual
    tokens]`` read by the kernel, with ``unit = length_unit(k_packed)``. The packed tensors and the
    residuals are then whole buffers (capacity), of which only the counted tokens are read, and
    ``kv_mask`` (if any) is indexed by absolute position (quantized tokens, then the residual), so
    it needs ``quantized capacity + residual capacity`` columns. Launch
    arguments then depend only on capacities, so one captured launch serves every step.

    Rotated layers store their packed history rotated and their residual window plain.
    ``rotate_q`` / ``rotate_out``: multiply the query of the packed splits by / their share of the
    output by the ``±1`` Hadamard matrix ``S`` in the kernels (a fast Walsh-Hadamard transform in
    registers), for layers whose packed keys / values are stored rotated, with the ``1/sqrt(D)``
    factors in ``scaling`` and ``out_scale`` (which then scales only the packed share).
    ``q_residual`` / ``scaling_residual`` (default ``q`` / ``scaling``): the query and softmax scale
    of the residual split, so a caller that rotated ``q`` itself passes the plain one here.
    :func:`kvtuner.attention.rotated_decode` uses ``rotate_out`` (the merge kernel); ``rotate_q``
    in the split kernel measured 7-16 % slower for the register-capped pairs on an H100,
    so the query keeps its matmul there. head_dim must be a power of two.

    ``launch_info``: a dict that receives the compiled split kernel under ``"split"`` (registers,
    spills and SASS for benchmarks).
    """
    launch = plan_launch(q, k_packed, k_residual, v_packed, v_residual, scaling, kv_mask, out_scale, block_n=block_n,
                         num_warps=num_warps, num_stages=num_stages, swap_qk=swap_qk, swap_pv=swap_pv, asm=asm,
                         fold_k=fold_k, fold_v=fold_v, maxnreg=maxnreg, splits_per_sm=splits_per_sm,
                         unpack3_k=unpack3_k, unpack3_v=unpack3_v, lengths=lengths, rotate_q=rotate_q,
                         rotate_out=rotate_out, dq16=dq16, q_residual=q_residual,
                         scaling_residual=scaling_residual)
    compiled = split_launcher(launch.split_grid, *launch.split_args, **launch.split_kwargs)
    merge_launcher(launch.merge_grid, *launch.merge_args, **launch.merge_kwargs)
    if launch_info is not None:
        launch_info["split"] = compiled
    return launch.out


def plan_launch(q: torch.Tensor, k_packed: QuantizedTensor | None, k_residual: torch.Tensor | None,
                     v_packed: QuantizedTensor | None, v_residual: torch.Tensor | None, scaling: float,
                     kv_mask: torch.Tensor | None = None, out_scale: float = 1.0, *, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None, swap_qk: bool | None = None,
                     swap_pv: bool | None = None, asm: bool | None = None, fold_k: str | None = None,
                     fold_v: str | None = None, maxnreg: int | None = None,
                     splits_per_sm: int | None = None, unpack3_k: str | None = None, unpack3_v: str | None = None,
                     lengths: torch.Tensor | None = None, rotate_q: bool = False,
                     rotate_out: bool = False, dq16: bool | None = None, q_residual: torch.Tensor | None = None,
                     scaling_residual: float | None = None, target: Target | None = None) -> Launch:
    """The two launches :func:`decode_attention` makes for these arguments, without running them.

    ``target`` (default: ``q``'s device) sets the SM count, PTX and launch table the choices are made
    for, so a launch for an H100 can be built, and compiled offline, on a machine without one.
    """
    if (rotate_q or rotate_out) and (q.shape[-1] & (q.shape[-1] - 1)):
        raise ValueError(f"rotate_q/rotate_out need a power-of-two head_dim; got {q.shape[-1]}")
    target = Target.of(q.device) if target is None else target
    b, hq, one, d = q.shape
    if lengths is not None and (k_packed is None or v_packed is None or k_residual is None or v_residual is None):
        raise ValueError("lengths= needs packed and residual buffers for keys and values (capacity views)")
    if lengths is not None and (lengths.dtype not in (torch.int32, torch.int64) or lengths.numel() != 2
                                or lengths.device != q.device):
        raise ValueError(f"lengths must be 2 int32/int64 values on {q.device}; got {lengths.dtype} x "
                         f"{lengths.numel()} on {lengths.device}")
    if one != 1:
        raise ValueError(f"q.shape[2]={one} is invalid; allowed: 1 (one decode token per sequence)")
    if q_residual is None:
        q_residual = q
    elif q_residual.shape != q.shape or q_residual.device != q.device:
        raise ValueError(f"q_residual {tuple(q_residual.shape)} on {q_residual.device} is invalid; allowed: "
                         f"q's shape {tuple(q.shape)} on {q.device}")
    if scaling_residual is None:
        scaling_residual = scaling
    n_q = 0 if k_packed is None else k_packed.num_tokens
    n_qv = 0 if v_packed is None else v_packed.num_tokens
    if lengths is not None:  # capacities: key buffers round up to whole groups, value buffers need not
        n_q = n_qv = min(n_q, n_qv)
    if n_q != n_qv:
        raise ValueError(f"quantized key/value token counts {n_q} and {n_qv} differ; allowed: equal (keys and "
                         "values flushed in step)")
    ref = k_residual if k_residual is not None else k_packed.scale
    hkv = ref.shape[1]
    n_r = 0 if k_residual is None else k_residual.shape[-2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {hkv}; allowed: a multiple")
    group = hq // hkv
    block_d = pow2(d)
    dummy, dummy_f = _placeholder(q.device, torch.uint8), _placeholder(q.device, q.dtype)
    if n_q:
        kc, ks, kz, vc, vs, vz = (k_packed.codes, k_packed.scale, k_packed.zero, v_packed.codes, v_packed.scale,
                                  v_packed.zero)
        kbits, vbits = k_packed.bits, v_packed.bits
        k_per_channel = k_packed.granularity == "per_channel"
        gk, gv = k_packed.group_size, v_packed.group_size
        if v_packed.granularity != "per_token":
            raise ValueError("values must be quantized per token")
        if not k_per_channel and (d % gk or block_d != d) and gk != d:
            raise ValueError(f"per-token key groups of {gk} channels need head_dim a power of two multiple")
        if (gv != d and (d % gv or block_d != d)):
            raise ValueError(f"value groups of {gv} channels need head_dim a power of two multiple")
        if v_packed.token_pairs:
            raise ValueError("values in token pairs are read by kernels.gluon_decode; allowed here: values packed "
                             "along head_dim or in token blocks")
        vt, kwords = v_packed.token_block, k_packed.channel_words
        vwords = v_packed.channel_words
        if vwords and (vbits != 3 or v_packed.token_block):
            raise ValueError(f"{vbits}-bit values in channel word order are not read by the kernel; allowed: keys, "
                             "and 3-bit values packed along head_dim (contiguous words)")
        if vt and (d % 8 or vt % 32):
            raise ValueError(f"token-blocked values need head_dim a multiple of 8 and the block ({vt}) of 32")
        gk_eff = block_d if (not k_per_channel and gk == d) else gk
        gv_eff = block_d if gv == d else gv
    else:
        kc = ks = kz = vc = vs = vz = None
        kbits = vbits = 8
        k_per_channel, gk_eff, gv_eff, vt, kwords, vwords = True, 32, block_d, 0, False, False
    if block_n is None:  # an empty history runs only the residual split: its placeholder bits/group pick no entry
        block_n = (default_block_n(kbits, vbits, block_d, gk_eff if k_per_channel else None, vt, target.table)
                   if n_q else gk_eff)
    if k_per_channel and block_n % gk_eff and gk_eff % block_n:
        raise ValueError(f"block_n={block_n} is invalid; allowed: a multiple or divisor of the key group {gk_eff}")
    if vt and block_n != vt:
        raise ValueError(f"block_n={block_n} is invalid for values in token blocks of {vt}; allowed: {vt}")
    given = (num_warps, num_stages, swap_qk, swap_pv, asm, fold_k, fold_v, maxnreg, splits_per_sm, unpack3_k, unpack3_v,
             dq16)
    (num_warps, num_stages, swap_qk, swap_pv, asm, fold_k, fold_v, maxnreg, splits_per_sm, unpack3_k,
     unpack3_v, dq16) = launch_choices(kbits, vbits, block_d, block_n, target, b * hkv < target.sms, given,
                                        "tokens" if vt else "groups" if k_per_channel and block_n > gk_eff else "")
    fit = programs_per_sm(maxnreg, num_warps) if maxnreg else None
    n_split_q, per_split = split_count(b * hkv, n_q, block_n, target.sms, splits_per_sm, fit)
    num_splits = n_split_q + 1
    rows = b * hq * num_splits
    partial = torch.empty(rows * (block_d + 2), device=q.device, dtype=torch.float32)  # one allocation
    po, pm, pl = partial[: rows * block_d].view(rows, block_d), partial[rows * block_d:][:rows], partial[-rows:]

    def st(t, n=3):
        return tuple(t.stride()[:n]) if t is not None else (0,) * n

    kr = k_residual if n_r else None
    vr = v_residual if n_r else None
    mask = kv_mask.to(torch.uint8) if kv_mask is not None else None
    kw, vw = (*PLANES[kbits], 0)[:2], (*PLANES[vbits], 0)[:2]  # bit planes, compile-time constants
    split_args = (
        q, q_residual, kc if kc is not None else dummy, ks if ks is not None else dummy_f, kz if kz is not None else dummy_f,
        vc if vc is not None else dummy, vs if vs is not None else dummy_f, vz if vz is not None else dummy_f,
        kr if kr is not None else dummy_f, vr if vr is not None else dummy_f, mask if mask is not None else dummy,
        lengths if lengths is not None else dummy, po, pm, pl,
        q.stride(0), q.stride(1), q_residual.stride(0), q_residual.stride(1),
        *st(kc), *st(ks), *st(vc), *st(vs), *st(kr), *st(vr),
        mask.stride(0) if mask is not None else 0,
        n_q, n_r, per_split, n_split_q, float(scaling) * LOG2E, float(scaling_residual) * LOG2E, hkv, group,
        num_splits)
    split_kwargs = dict(
        BLOCK_H=max(16, pow2(group)), D=d, BLOCK_D=block_d,
        KW0=kw[0], KW1=kw[1], VW0=vw[0], VW1=vw[1], K_PER_CHANNEL=k_per_channel, GK=gk_eff, GV=gv_eff, BLOCK_N=block_n,
        BLOCK_R=32, HAS_MASK=mask is not None, SWAP_QK=bool(swap_qk), SWAP_PV=bool(swap_pv), ASM=bool(asm),
        FOLD_K=FOLDS[fold_k], FOLD_V=FOLDS[fold_v], DEV_LEN=lengths is not None,
        QUNIT=length_unit(k_packed) if lengths is not None else 1, UNPACK3_K=UNPACK3[unpack3_k] if asm else 0,
        UNPACK3_V=UNPACK3[unpack3_v] if asm else 0, VT=vt, KWORDS=kwords, VWORDS=vwords, ROT_Q=bool(rotate_q),
        LOG_D=block_d.bit_length() - 1, DQ16=bool(dq16), num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    out = torch.empty(b, 1, hq, d, device=q.device, dtype=q.dtype)
    merge_args = (po, pm, pl, out, out.stride(0), out.stride(2), hq, num_splits, float(out_scale))
    merge_kwargs = dict(D=d, BLOCK_D=block_d, BLOCK_S=max(2, pow2(num_splits)), ROT_O=bool(rotate_out),
                        LOG_D=block_d.bit_length() - 1)
    return Launch((b * hkv, num_splits), split_args, split_kwargs, (b * hq,), merge_args, merge_kwargs, out)



def max_int32_offset(batch: int, heads: int, tokens: int, row_bytes: int) -> bool:
    """Whether the largest byte offset of a ``[batch, heads, tokens, row_bytes]`` buffer passes int32
    (the kernel then relies on its int64 offsets)."""
    return batch * heads * tokens * row_bytes - 1 > 2**31 - 1


decode_attention.fuses_rotation = True  # rotated_decode hands it the output's Hadamard transform

__all__ = ["Launch", "decode_attention", "max_int32_offset", "plan_launch"]
