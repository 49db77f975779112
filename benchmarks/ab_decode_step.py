"""A/B of whole decode steps (CUDA graph) per plan, with 3-bit codes as contiguous words and as bit planes.

    PYTHONPATH=src python benchmarks/ab_decode_step.py --layers 30 --batch 64 --context 4096 \
        --plan-file searched3.25=benchmarks/results/smollm2-rot3-sink1-kl512.plan-3.25.json \
        --out benchmarks/results/words3_check_h200/decode_step_words3.md

Llama-3.1-8B shape with random bf16 weights (bench_decode.build), each cache filled with random keys and
values through ``Cache.update`` (bench_decode.fill), then ``--steps`` graph-replayed decode steps
(bench_decode.decode_graph). Plans: uniform KIVI KV2, K4V2, KV3, K4V3, KV4 (the plans' default group)
and any ``--plan-file``. A plan with 3-bit layers runs twice, in both layouts (``kvtuner.cache.WORDS3``),
interleaved over ``--repeats`` rounds so that drift hits both alike; the table gives each one's median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import transformers
import triton

sys.path.insert(0, "benchmarks")
from bench_decode import build, decode_graph, fill, plan_files  # noqa: E402

from kvtuner import KVPlan  # noqa: E402
from kvtuner import cache as kv_cache  # noqa: E402

UNIFORM = ((2, 2), (4, 2), (3, 3), (4, 3), (4, 4))


def has_three_bits(plan: KVPlan) -> bool:
    return any(3 in (lay.k.bits, lay.v.bits) for lay in plan.layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plan-file", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--out", default=None, help="markdown result file (default: print only)")
    args = ap.parse_args()
    t_start = time.time()
    model = build(args.layers)
    named = {f"K{k}V{v}": KVPlan.uniform(args.layers, k, v, "kivi") for k, v in UNIFORM}
    named.update(plan_files(args.plan_file, args.layers))
    runs = [(name, layout) for name, plan in named.items()
            for layout in (("words", "planes") if has_three_bits(plan) else ("",))]
    times: dict[tuple[str, str], list[float]] = {r: [] for r in runs}
    for _ in range(args.repeats):
        for name, layout in runs:
            kv_cache.WORDS3 = {"words": True, "planes": False}.get(layout)
            cache = fill(model, named[name], args.batch, args.context, reserve=args.steps + 16)
            times[name, layout].append(1e3 * decode_graph(model, cache, args.batch, args.steps))
            print(name, layout, f"{times[name, layout][-1]:.2f} ms/step", flush=True)
            del cache
            torch.cuda.empty_cache()
    kv_cache.WORDS3 = None
    lines = [f"# Decode step per plan: 3-bit codes as contiguous words vs bit planes ({args.layers} layers)", "",
             f"GPU: {torch.cuda.get_device_properties(0).name}; torch {torch.__version__}, triton "
             f"{triton.__version__}, transformers {transformers.__version__}. Command: `PYTHONPATH=src python "
             f"benchmarks/ab_decode_step.py {' '.join(sys.argv[1:])}` ({time.time() - t_start:.0f} s). "
             f"Llama-3.1-8B shape, random bf16 weights, B = {args.batch}, L = {args.context}, KIVI; "
             f"median of {args.repeats} rounds of {args.steps} CUDA-graph steps.", "",
             "| plan | equivalent bits | layout of 3-bit codes | ms/step | rounds |", "|---|---|---|---|---|"]
    for name, layout in runs:
        t = times[name, layout]
        lines.append(f"| {name} | {named[name].equivalent_bits:.2f} | {layout or '-'} | {statistics.median(t):.2f} "
                     f"| {', '.join(f'{x:.2f}' for x in t)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
