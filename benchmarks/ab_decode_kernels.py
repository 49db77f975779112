"""End to end on the GPU: whole CUDA-graph decode steps of a 32-layer Llama-3.1-8B-shaped model (random bf16
weights) with each decode-attention kernel (``KernelPolicy(decode="triton")``, ``"gluon"``, and ``"gluon"`` with
``decode_stages=3``: "gluon-ring"), alternating, and the strong bf16 baseline (``strong_bf16.py``: static buffers, flash SDPA, CUDA graph) in the same run, at
batch ``--batch`` and at the largest batch whose cache fits ``--budget-gib`` (the throughput metric).

    PYTHONPATH=src python benchmarks/ab_decode_kernels.py [--batch 64] [--context 4096] [--repeats 2]
        [--budget-gib 30] [--kernels triton,gluon,gluon-ring]
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, "benchmarks")

import strong_bf16  # noqa: E402
from bench_decode import build, decode_graph, fill, plans  # noqa: E402
from provenance import hbm_peak, provenance, publish  # noqa: E402

from kvtuner import KernelPolicy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default="KV4,C3.25")
    ap.add_argument("--budget-gib", type=float, default=30.0, help="KV memory for the maximum-batch rows (0: none)")
    ap.add_argument("--max-batch-configs", default=None, help="configs run at the maximum batch too (default: all)")
    ap.add_argument("--kernels", default="triton,gluon,gluon-ring",
                    help="triton, gluon (tiles loaded into registers), gluon-ring (a 3-stage cp.async ring)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    peak = hbm_peak()  # before the runs: a GPU without a known peak fails here, not after them
    model = build(32)
    weights = torch.cuda.memory_allocated()
    named = plans(32)
    b, ctx, steps = args.batch, args.context, args.steps
    reserve = 2 * steps + 16
    budget = args.budget_gib * 2**30

    def max_batch(plan):
        per_seq = strong_bf16.kv_bytes(model, 1, ctx + reserve) if plan is None else plan.expected_nbytes(
            model.config, ctx + reserve, 1, dtype_bytes=2)
        return int(budget // per_seq)

    batches = [b] + ([max_batch(None)] if budget else [])
    bf16 = {bb: min(strong_bf16.step_seconds(model, bb, ctx, steps) for _ in range(args.repeats)) for bb in batches}
    best: dict = {}
    for _ in range(args.repeats):
        for name in args.configs.split(","):
            at_max = budget and (args.max_batch_configs is None or name in args.max_batch_configs.split(","))
            for bb in [b] + ([max_batch(named[name])] if at_max else []):
                for decode in args.kernels.split(","):
                    ring = decode.endswith("-ring")
                    policy = KernelPolicy(decode=decode.removesuffix("-ring"), decode_stages=3 if ring else 0)
                    cache = fill(model, named[name], bb, ctx, reserve, static=True, policy=policy)
                    kv = torch.cuda.memory_allocated() - weights
                    dt = decode_graph(model, cache, bb, steps)
                    del cache
                    torch.cuda.empty_cache()
                    best[(name, bb, decode)] = min(best.get((name, bb, decode), (dt, kv)), (dt, kv))
                    print(name, bb, decode, f"{1e3 * dt:.2f} ms/step", flush=True)
    lines = [f"# Decode steps by attention kernel, B = {b}, {ctx}-token context (Llama-3.1-8B shape, 32 layers)", "",
             provenance(), f"Command: `python benchmarks/ab_decode_kernels.py {' '.join(sys.argv[1:])}`; each "
             f"quantized row is the best of {args.repeats} alternating runs of {steps} steps (StaticDecoder), the bf16 "
             f"row the best of {args.repeats}.", "",
             "| config | batch | kernel | ms/step | tokens/s | step vs strong bf16 at this batch | tokens/s vs strong "
             "bf16 at its largest batch | share of HBM peak (weights + KV read once) |", "|---|---|---|---|---|---|---|---|"]
    top = max(bb / dt for bb, dt in bf16.items()) if budget else None
    for bb, dt in bf16.items():
        lines.append(f"| bf16, strong baseline | {bb} | flash SDPA | {1e3 * dt:.2f} | {bb / dt:,.0f} | 1.00x | "
                     f"{'' if top is None else f'{bb / dt / top:.2f}x'} | "
                     f"{(weights + strong_bf16.kv_bytes(model, bb, ctx)) / dt / peak:.0%} |")
    for (name, bb, decode), (dt, kv) in best.items():
        same = f"{dt / bf16[bb]:.2f}x" if bb in bf16 else ""
        lines.append(f"| {name} | {bb} | {decode} | {1e3 * dt:.2f} | {bb / dt:,.0f} | {same} | "
                     f"{'' if top is None else f'{bb / dt / top:.2f}x'} | {(weights + kv) / dt / peak:.0%} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
