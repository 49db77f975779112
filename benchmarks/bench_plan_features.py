"""What rotation, sink tokens and query-aware key rounding cost per decode step: each plan file against the
same pairs without them.

    PYTHONPATH=src python benchmarks/bench_plan_features.py benchmarks/results/cpu/smollm2-plan-*.json \
        --out benchmarks/results/h100/plan_features.md

Each plan's per-layer (K bits, V bits) are kept; the "plain" twin drops Hadamard rotation, sink tokens
and query-aware key rounding. Both run at Llama-3.1-8B's layer shape (32 query heads, 8 KV heads,
head_dim 128, random bf16 weights) with as many layers as the plan has, the cache filled with random keys
and values, one-token decode steps replayed from a CUDA graph (``StaticDecoder``; the flushes of the
residual window into packed storage, where key rounding runs, happen between the timed steps: time at
least 32 steps so that each layer flushes), alternating plan and twin ``--repeats`` times; the best time
of each counts. A plan with key rounding gets second moments measured on the bench model (its own are for
another model's shape).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")

from bench_decode import build, decode_graph, fill  # noqa: E402
from provenance import provenance, publish  # noqa: E402

from kvtuner import KVPlan  # noqa: E402


def plain_twin(plan: KVPlan) -> KVPlan:
    return KVPlan.from_pairs([(lay.k.bits, lay.v.bits) for lay in plan.layers], plan.layers[0].k.mode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--shapes", default="64x4096,8x32768")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no new row after this many seconds (0: no limit); the file names the rows left out")
    args = ap.parse_args()
    t_start = time.time()
    # the per-layer specs only: the plans were searched for another model (speed depends on bits, rotation, sink)
    loaded = {Path(p).name: KVPlan.load(p) for p in args.plans}
    layers = {p.num_layers for p in loaded.values()}
    if len(layers) != 1:
        raise SystemExit(f"the plans have {sorted(layers)} layers; allowed: one layer count")
    model = build(layers.pop())
    rounding = None
    if any(p.key_rounding is not None for p in loaded.values()):
        from kvtuner.rounding import query_moments

        rounding = query_moments(model, [torch.randint(0, 1000, (1, 512), device="cuda")])
    plans = {name: KVPlan(p.layers, key_rounding=rounding if p.key_rounding is not None else None)
             for name, p in loaded.items()}
    rows, skipped = [], []
    for shape in args.shapes.split(","):
        batch, ctx = (int(x) for x in shape.split("x"))
        for name, plan in plans.items():
            if args.budget_s and time.time() - t_start > args.budget_s:
                skipped.append(f"{shape} {name}")
                continue
            best = {"plan": float("inf"), "plain": float("inf")}
            for _ in range(args.repeats):
                for kind, p in (("plan", plan), ("plain", plain_twin(plan))):
                    cache = fill(model, p, batch, ctx, args.steps + 8, static=True)
                    best[kind] = min(best[kind], decode_graph(model, cache, batch, args.steps))
                    del cache
                    torch.cuda.empty_cache()
            rows.append((shape, name, plan.equivalent_bits, 1e3 * best["plan"], 1e3 * best["plain"]))
            print(rows[-1], flush=True)
    lines = ["# Decode-step cost of rotation, sink tokens and key rounding (Llama-3.1-8B layer shape, random bf16 "
             "weights)", "",
             f"Command: `python benchmarks/bench_plan_features.py {' '.join(sys.argv[1:])}`. {provenance()}. "
             f"{time.time() - t_start:.0f} s.", "",
             "Each plan (rotation per layer, one sink token" + (", query-aware key rounding" if rounding else "")
             + ", as `kvtuner tune` wrote it) against its plain twin (the same (K, V) bits per layer, no rotation, "
             "no sink, nearest rounding), whole one-token decode steps replayed from a CUDA graph with the flushes "
             f"between them, best of {args.repeats} alternating runs of {args.steps} steps.", "",
             "| B x L | plan | bits | ms/step, plan | ms/step, plain twin | plan / twin |", "|---|---|---|---|---|---|"]
    lines += [f"| {s} | {n} | {b:.2f} | {p:.2f} | {q:.2f} | {p / q:.3f} |" for s, n, b, p, q in rows]
    if skipped:
        lines += ["", f"Not run (past --budget-s {args.budget_s:.0f}): {', '.join(skipped)}."]
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
