"""Quality of uniform plans on SmolLM2 through the real cache, against full precision.

    python benchmarks/bench_quality.py --out benchmarks/results/cpu/quality_smollm2.md

Protocol (`kvtuner.Evaluator` defaults): 2 windows of held-out pydoc text, each a 384-token
prefill then 256 teacher-forced one-token decode steps (512 scored tokens); 4 greedy
continuations of 64 tokens from 64-token prompts; passkey retrieval at 512 and 1024 tokens
(3 trials each).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

import kvtuner
from kvtuner import KVPlan, load_model
from kvtuner.evaluation import Evaluator

PAIRS = [(8, 8), (8, 4), (4, 8), (4, 4), (4, 2), (2, 4), (2, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load_model("smollm2")
    ev = Evaluator(model, tok)
    t0 = time.perf_counter()
    ref = ev.reference()
    rows = []
    for mode in ("kivi", "per_token"):
        for k, v in PAIRS:
            r = ev(KVPlan.uniform(model.config.num_hidden_layers, k, v, mode))
            rows.append(dict(mode=mode, **r.to_dict()))
            print(rows[-1], flush=True)
    seconds = time.perf_counter() - t0
    pk = lambda d: " / ".join(f"{d[n]:.2f}" for n in sorted(d))  # noqa: E731
    lines = ["| mode | pair | eq. bits | bytes/token | PPL | vs full | KL | top-1 | gen. identical | "
             "gen. prefix | passkey 512 / 1024 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['plan']} | {r['equivalent_bits']:.1f} | {r['bytes_per_token']:.0f} | "
              f"{r['ppl']:.3f} | {100 * (r['ppl'] / r['full_ppl'] - 1):+.2f} % | {r['kl']:.4f} | {r['top1']:.3f} | "
              f"{r['generation_agreement']:.2f} | {r['generation_prefix']:.1f} | {pk(r['passkey'])} |" for r in rows]
    meta = (f"SmolLM2-135M-Instruct (fp32 weights from the Q4_1 GGUF), held-out pydoc text. Full precision: "
            f"PPL {rows[0]['full_ppl']:.3f}, passkey {pk(ref.passkey)}. {len(rows)} plans in {seconds:.0f} s. "
            f"kvtuner {kvtuner.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, CPU.")
    table = "\n".join(lines)
    print(meta, table, sep="\n\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Quality of uniform KV plans on SmolLM2\n\n{meta}\n\nCommand: `python "
                    f"benchmarks/bench_quality.py --out {args.out}`\n\n{__doc__.split(chr(10), 3)[3]}\n{table}\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
