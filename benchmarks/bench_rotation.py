"""Does Hadamard rotation (and 3-/6-bit codes) help? Uniform plans on SmolLM2, with and without rotation.

    python benchmarks/bench_rotation.py --out benchmarks/results/cpu/rotation_smollm2.md

Protocol: `kvtuner.Evaluator` on held-out pydoc text, ``--windows`` (default 1) windows of
384-token prefill + 256 teacher-forced one-token decode steps through the real cache (the first
window of `bench_quality.py`'s protocol), 2 greedy continuations of 32 tokens; no passkey. KIVI
and per-token modes.
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

PAIRS = [(4, 4), (4, 3), (3, 3), (4, 2), (2, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--pairs", default=",".join(f"{k}{v}" for k, v in PAIRS), help="e.g. 44,42,22 (k then v bits)")
    ap.add_argument("--modes", default="kivi,per_token")
    ap.add_argument("--windows", type=int, default=1, help="held-out windows (384 prefill + 256 decode each)")
    ap.add_argument("--per-token-pairs", default="44,42,22", help="pairs for per_token mode (fewer: it is slow)")
    ap.add_argument("--sink", type=int, default=0, help="also evaluate every plan with this many full-precision sink "
                    "tokens (QuantSpec.sink_length)")
    args = ap.parse_args()
    pairs = [(int(p[0]), int(p[1])) for p in args.pairs.split(",")]
    model, tok = load_model("smollm2")
    n = model.config.num_hidden_layers
    ev = Evaluator(model, tok, windows=args.windows, passkey_lengths=(), prompts=2, new_tokens=32)
    t0 = time.perf_counter()
    rows = []
    pt_pairs = [(int(p[0]), int(p[1])) for p in args.per_token_pairs.split(",")]
    for mode in args.modes.split(","):
        for k, v in (pt_pairs if mode == "per_token" else pairs):
            for sink in sorted({0, args.sink}):
                for rot in (False, True):
                    r = ev(KVPlan.uniform(n, k, v, mode, rotation=rot, sink_length=sink))
                    rows.append(dict(mode=mode, rotation=rot, sink=sink, **r.to_dict()))
                    print({x: rows[-1][x] for x in ("mode", "plan", "rotation", "sink", "ppl", "kl", "top1")},
                          flush=True)
    seconds = time.perf_counter() - t0
    by = {(r["mode"], r["equivalent_bits"], r["plan"].replace("r", ""), r["rotation"], r["sink"]): r for r in rows}
    lines = ["| mode | pair | eq. bits | bytes/token | rotation | sink | PPL | vs full | KL | KL rotated / plain | "
             "KL / no sink | top-1 | gen. prefix |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["mode"], r["equivalent_bits"], r["plan"].replace("r", ""))
        ratio = f"{r['kl'] / by[(*key, False, r['sink'])]['kl']:.2f}" if r["rotation"] else ""
        sink_ratio = f"{r['kl'] / by[(*key, r['rotation'], 0)]['kl']:.2f}" if r["sink"] else ""
        lines.append(f"| {r['mode']} | {r['plan']} | {r['equivalent_bits']:.1f} | {r['bytes_per_token']:.0f} | "
                     f"{'yes' if r['rotation'] else 'no'} | {r['sink']} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / r['full_ppl'] - 1):+.2f} % | {r['kl']:.4f} | {ratio} | {sink_ratio} | "
                     f"{r['top1']:.3f} | {r['generation_prefix']:.1f} |")
    meta = (f"SmolLM2-135M-Instruct (fp32 weights from the Q4_1 GGUF), held-out pydoc text; full precision PPL "
            f"{rows[0]['full_ppl']:.3f}. {len(rows)} plans in {seconds:.0f} s. kvtuner {kvtuner.__version__}, torch "
            f"{torch.__version__}, transformers {transformers.__version__}, CPU ({torch.get_num_threads()} threads).")
    table = "\n".join(lines)
    print(meta, table, sep="\n\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Rotation and 3/6-bit codes on SmolLM2 (uniform plans)\n\n{meta}\n\nCommand: `python "
                    f"benchmarks/bench_rotation.py --out {args.out} --windows {args.windows} --pairs {args.pairs} "
                    f"--modes {args.modes} --sink {args.sink}`\n\n{__doc__.split(chr(10), 3)[3]}\n{table}\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
