"""The strongest bf16 decode step we know how to build with stock PyTorch and transformers, the baseline of
every speed ratio: static per-layer bf16 K/V buffers, SDPA with ``enable_gqa`` and no mask (flash), the whole
one-token step captured in a CUDA graph. Every sequence has the same length, so no mask is needed.

    PYTHONPATH=src python benchmarks/strong_bf16.py --ctx 4096 --batches 64 --budget-gib 30

``step_seconds(model, batch, ctx)`` is what ``bench_decode.py`` uses for its bf16 rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "kvtuner_bench_static_bf16"
_BUFFERS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
_LENGTH = {"tokens": 0}


def _static_attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
    kb, vb = _BUFFERS[module.layer_idx]
    n = _LENGTH["tokens"]
    kb[:, :, n:n + 1].copy_(k)
    vb[:, :, n:n + 1].copy_(v)
    o = F.scaled_dot_product_attention(q, kb[:, :, :n + 1], vb[:, :, :n + 1], scale=scaling, enable_gqa=True)
    return o.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, _static_attention)
try:  # no mask is built for this attention function (transformers >= 5 has the mask interface)
    from transformers import AttentionMaskInterface

    AttentionMaskInterface.register(NAME, lambda *a, **k: None)
except ImportError:
    pass


def kv_bytes(model, batch: int, ctx: int) -> int:
    cfg = model.config
    return cfg.num_hidden_layers * 2 * batch * cfg.num_key_value_heads * (ctx + 8) * cfg.head_dim * 2


@torch.no_grad()
def step_seconds(model, batch: int, ctx: int, steps: int = 20) -> float:
    """Seconds per one-token decode step over ``ctx`` cached tokens (random bf16), replayed from a CUDA graph."""
    cfg = model.config
    before = cfg._attn_implementation
    cfg._attn_implementation = NAME
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        shape = (batch, cfg.num_key_value_heads, ctx + 8, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            _BUFFERS[i] = tuple(torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        _LENGTH["tokens"] = ctx
        tok = torch.randint(0, 1000, (batch, 1), device="cuda")
        pos = torch.full((batch, 1), ctx, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(input_ids=tok, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(input_ids=tok, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
        graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps
    finally:
        cfg._attn_implementation = before
        _BUFFERS.clear()
        torch.cuda.empty_cache()


def main() -> None:
    import sys

    sys.path.insert(0, "benchmarks")
    from bench_decode import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--batches", default="64", help="comma list; the max batch in --budget-gib is added")
    ap.add_argument("--budget-gib", type=float, default=30.0)
    ap.add_argument("--peak-tbs", type=float, default=None, help="HBM peak (default: the GPU's, provenance.HBM_PEAK)")
    args = ap.parse_args()
    if args.peak_tbs is None:
        from provenance import hbm_peak

        args.peak_tbs = hbm_peak() / 1e12
    model = build(32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_seq = kv_bytes(model, 1, args.ctx)
    batches = [int(b) for b in args.batches.split(",") if b] + [int(args.budget_gib * 2**30 // per_seq)]
    for b in batches:
        dt = step_seconds(model, b, args.ctx)
        kv = kv_bytes(model, b, args.ctx)
        print(json.dumps(dict(batch=b, ctx=args.ctx, ms_per_step=1e3 * dt, tokens_per_s=b / dt, kv_gib=kv / 2**30,
                              hbm_share=(weights + kv) / dt / (args.peak_tbs * 1e12))), flush=True)


if __name__ == "__main__":
    main()
