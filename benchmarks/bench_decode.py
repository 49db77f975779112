"""End-to-end batched decode on GPU at Llama-3.1-8B shape (random bf16 weights): kvtuner plans vs bf16.

    python benchmarks/bench_decode.py --out benchmarks/results/decode_h100.md

The model is built from a Llama-3.1-8B config with random weights (speed does not depend on the
values). For each (batch, context) the cache is filled directly with random keys/values through
the public ``Cache.update`` (a prefill of B x L tokens would only add time, not change the decode
step), then ``steps`` one-token decode steps run through ``model(...)`` with the public path.
No CUDA graphs: the cache's bookkeeping is Python, so this is an eager-mode step.

Configurations: bf16 DynamicCache, KIVI KV8, KV4, K4V2 and KVTuner's published 3.25-bit
Llama-3.1-8B KIVI plan (KVTuner-C3.25: K8V4 {13,17}; KV4 {1-3,7,29,31}; K4V2 {5,6,8-12,14-16,
18-24,26,28,30}; KV2 {0,4,25,27}); no search was run on a real Llama here.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
import triton
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvtuner import KVPlan, MixedPrecisionCache

C325 = {13: (8, 4), 17: (8, 4), **{i: (4, 4) for i in (1, 2, 3, 7, 29, 31)}, **{i: (2, 2) for i in (0, 4, 25, 27)}}


def plans(n: int) -> dict[str, KVPlan | None]:
    c325 = KVPlan.from_pairs([C325.get(i, (4, 2)) for i in range(n)], "kivi")
    return {"bf16": None, "KV8": KVPlan.uniform(n, 8, 8, "kivi"), "KV4": KVPlan.uniform(n, 4, 4, "kivi"),
            "K4V2": KVPlan.uniform(n, 4, 2, "kivi"), f"C{c325.equivalent_bits:.2f}": c325}


def build(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, torch_dtype="bfloat16")
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def fill(model, plan: KVPlan | None, batch: int, ctx: int):
    cfg = model.config
    cache = DynamicCache(config=cfg) if plan is None else MixedPrecisionCache(plan, cfg, max_cache_len=ctx + 256)
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(batch, 8, ctx, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(batch, 8, ctx, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        cache.update(k, v, layer)
        del k, v
    return cache


@torch.no_grad()
def decode(model, cache, batch: int, steps: int) -> float:
    tok = torch.randint(0, 1000, (batch, 1), device="cuda")
    for _ in range(2):  # warm-up (compiles kernels)
        tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/decode_gpu.md")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget-gib", type=float, default=40.0, help="GPU memory for the KV cache")
    ap.add_argument("--grid", default="1x4096,8x4096,32x4096,64x4096,8x16384,8x32768")
    args = ap.parse_args()
    t_start = time.time()
    model = build(args.layers)
    weights = torch.cuda.memory_allocated()
    rows = []
    grid = [tuple(int(x) for x in item.split("x")) for item in args.grid.split(",")]
    named = plans(args.layers)
    cfg = model.config

    def run(name, plan, batch, ctx, tag=""):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            cache = fill(model, plan, batch, ctx)
            kv = torch.cuda.memory_allocated() - weights
            dt = decode(model, cache, batch, args.steps)
        except torch.OutOfMemoryError:
            rows.append(dict(config=name, batch=batch, context=ctx, note="out of memory", tag=tag))
            return None
        finally:
            cache = None
            torch.cuda.empty_cache()
        rows.append(dict(config=name, batch=batch, context=ctx, ms_per_step=1e3 * dt, tokens_per_s=batch / dt,
                         kv_gib=kv / 2**30, peak_gib=torch.cuda.max_memory_allocated() / 2**30, tag=tag))
        print(rows[-1], flush=True)
        return batch / dt

    for batch, ctx in grid:
        for name, plan in named.items():
            run(name, plan, batch, ctx)
    # maximum throughput under a fixed KV budget at 4096 tokens (the paper's metric)
    ctx = 4096
    for name, plan in named.items():
        p = plan or KVPlan.uniform(args.layers, 16, 16)
        per_seq = p.expected_nbytes(cfg, ctx + args.steps + 2, dtype_bytes=2)
        batch = max(1, int(args.budget_gib * 2**30 // per_seq))
        run(name, plan, batch, ctx, tag=f"max batch in {args.budget_gib:g} GiB")
    props = torch.cuda.get_device_properties(0)
    lines = [f"# End-to-end decode, Llama-3.1-8B shape ({args.layers} layers), random bf16 weights", "",
             f"GPU: {props.name}; torch {torch.__version__}, triton {triton.__version__}, transformers "
             f"{transformers.__version__}. Command: `python benchmarks/bench_decode.py` "
             f"(--steps {args.steps}, --budget-gib {args.budget_gib:g}); {time.time() - t_start:.0f} s. Eager mode, "
             "no CUDA graphs. KV caches filled through Cache.update, then timed one-token decode steps.", "",
             "| config | batch | context | ms/step | tokens/s | KV GiB | peak GiB | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms_per_step" in r:
            lines.append(f"| {r['config']} | {r['batch']} | {r['context']} | {r['ms_per_step']:.1f} | "
                         f"{r['tokens_per_s']:.0f} | {r['kv_gib']:.1f} | {r['peak_gib']:.1f} | {r['tag']} |")
        else:
            lines.append(f"| {r['config']} | {r['batch']} | {r['context']} | | | | | {r['note']} {r['tag']} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out.replace(".md", ".json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
