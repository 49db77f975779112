"""KV cache memory on SmolLM2: measured ``MixedPrecisionCache.nbytes()`` vs. the bf16 DynamicCache.

Fills the cache with real text (prefill, then decode steps so that group flushes happen) to
``--tokens`` tokens and compares the measured ratio with the analytical one from the plan
(codes + scales/zeros + residual window, ``KVPlan.expected_nbytes``).

    python benchmarks/bench_memory.py --tokens 2048 --out benchmarks/results/cpu/memory_smollm2.md

Prints a table, then one JSON line with all rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from provenance import provenance
from transformers import DynamicCache

from kvtuner import KVPlan, MixedPrecisionCache, load_model, with_cache
from kvtuner.data import default_texts, token_ids

PAIRS = [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2)]
MODES = ["per_token", "kivi"]


def dynamic_nbytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def fill(model, ids: torch.Tensor, cache, decode_steps: int):
    model(ids[:, :-decode_steps], **with_cache(model, cache))
    for i in range(ids.shape[1] - decode_steps, ids.shape[1]):
        model(ids[:, i:i + 1], **with_cache(model, cache))
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--decode-steps", type=int, default=40)
    ap.add_argument("--out", default=None, help="markdown file for the results table")
    args = ap.parse_args()

    model, tok = load_model("smollm2", dtype=torch.bfloat16)
    ids = token_ids(tok, default_texts("evaluation"), args.tokens)
    ref = fill(model, ids, DynamicCache(config=model.config), args.decode_steps)
    ref_bytes = dynamic_nbytes(ref)
    rows = []
    for mode in MODES:
        for k, v in PAIRS:
            plan = KVPlan.uniform(model.config.num_hidden_layers, k, v, mode)
            t0 = time.perf_counter()
            cache = fill(model, ids, MixedPrecisionCache(plan, model.config), args.decode_steps)
            seconds = time.perf_counter() - t0
            measured = cache.nbytes() / ref_bytes
            analytical = plan.expected_nbytes(model.config, args.tokens) / ref_bytes
            rows.append(dict(mode=mode, pair=plan.layers[0].name, equivalent_bits=plan.equivalent_bits,
                             nbytes=cache.nbytes(), dynamic_bf16_nbytes=ref_bytes, measured_ratio=measured,
                             analytical_ratio=analytical, rel_diff=measured / analytical - 1,
                             paper_ratio=plan.equivalent_bits / 16,
                             bytes_per_token=plan.bytes_per_token(model.config), fill_seconds=seconds))
    header = ("| mode | pair | eq. bits | bytes/token | measured nbytes / bf16 | analytical | diff | bits/16 |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['mode']} | {r['pair']} | {r['equivalent_bits']:.1f} | {r['bytes_per_token']:.0f} | "
             f"{r['measured_ratio']:.4f} | {r['analytical_ratio']:.4f} | {100 * r['rel_diff']:+.2f} % | "
             f"{r['paper_ratio']:.4f} |" for r in rows]
    meta = (f"SmolLM2-135M-Instruct (30 layers, 3 KV heads, head_dim 64), bf16, {args.tokens} tokens of held-out "
            f"pydoc text ({args.tokens - args.decode_steps} prefill + {args.decode_steps} decode steps), batch 1. "
            f"bf16 DynamicCache: {ref_bytes} bytes. {provenance()}.")
    table = "\n".join([header, *lines])
    print(meta, table, sep="\n\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# KV cache memory ratios on SmolLM2\n\n{meta}\n\nCommand: `python benchmarks/bench_memory.py "
                    f"--tokens {args.tokens} --decode-steps {args.decode_steps} --out {args.out}`\n\n{table}\n\n"
                    "`measured` is `MixedPrecisionCache.nbytes()` (codes + scales/zeros + residual, bytes really "
                    "held); `analytical` is `KVPlan.expected_nbytes()` from the storage rules; `bits/16` is the "
                    "paper's equivalent-bits ratio, which ignores metadata and the residual window.\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
