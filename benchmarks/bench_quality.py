"""Perplexity of uniform plans on SmolLM2, through the real cache, against full precision.

    python benchmarks/bench_quality.py --tokens 1024 --out benchmarks/results/quality_smollm2.md

Protocol: the first 1024 tokens of the held-out pydoc split; a 256-token prefill, then 16-token
teacher-forced steps through the cache (so history, residual window and flushes are all used).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

import kvtuner
from kvtuner import KVPlan, load_model, perplexity
from kvtuner.data import default_texts, token_ids

PAIRS = [(8, 8), (8, 4), (4, 8), (4, 4), (4, 2), (2, 4), (2, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load_model("smollm2")
    ids = token_ids(tok, default_texts("evaluation"), args.tokens)
    kw = dict(prefill=256, chunk_size=16)
    full = perplexity(model, ids, None, **kw)
    rows = []
    for mode in ("kivi", "per_token"):
        for k, v in PAIRS:
            plan = KVPlan.uniform(model.config.num_hidden_layers, k, v, mode)
            t0 = time.perf_counter()
            ppl = perplexity(model, ids, plan, **kw)
            rows.append(dict(mode=mode, pair=plan.layers[0].name, equivalent_bits=plan.equivalent_bits,
                             bytes_per_token=plan.bytes_per_token(model.config), ppl=ppl, full_ppl=full,
                             increase=ppl / full - 1, seconds=time.perf_counter() - t0))
    lines = ["| mode | pair | eq. bits | bytes/token (bf16 metadata) | ppl | vs full |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['pair']} | {r['equivalent_bits']:.1f} | {r['bytes_per_token']:.0f} | "
              f"{r['ppl']:.3f} | {100 * r['increase']:+.2f} % |" for r in rows]
    meta = (f"SmolLM2-135M-Instruct (fp32 weights from the Q4_1 GGUF), {args.tokens} held-out pydoc tokens, "
            f"prefill 256 + 16-token teacher-forced steps. Full-precision perplexity {full:.3f}. "
            f"kvtuner {kvtuner.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, CPU.")
    table = "\n".join(lines)
    print(meta, table, sep="\n\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Perplexity of uniform KV plans on SmolLM2\n\n{meta}\n\nCommand: `python "
                    f"benchmarks/bench_quality.py --tokens {args.tokens} --out {args.out}`\n\n{table}\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
