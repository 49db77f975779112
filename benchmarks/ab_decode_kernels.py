"""End to end on the GPU: whole CUDA-graph decode steps of a 32-layer Llama-3.1-8B-shaped model (random bf16
weights) with each decode-attention kernel (``KernelPolicy(decode="triton")`` and ``"gluon"``), alternating,
and the strong bf16 baseline (``strong_bf16.py``: static buffers, flash SDPA, CUDA graph) in the same run.

    PYTHONPATH=src python benchmarks/ab_decode_kernels.py [--batch 64] [--context 4096] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, "benchmarks")

import strong_bf16  # noqa: E402
from bench_decode import build, decode_graph, fill, plans  # noqa: E402
from provenance import provenance, publish  # noqa: E402

from kvtuner import KernelPolicy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default="KV4,C3.25")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    model = build(32)
    weights = torch.cuda.memory_allocated()
    named = plans(32)
    b, ctx, steps = args.batch, args.context, args.steps
    best: dict = {}
    bf16 = min(strong_bf16.step_seconds(model, b, ctx, steps) for _ in range(args.repeats))
    for _ in range(args.repeats):
        for name in args.configs.split(","):
            for decode in ("triton", "gluon"):
                cache = fill(model, named[name], b, ctx, 2 * steps + 16, static=True, policy=KernelPolicy(decode=decode))
                kv = torch.cuda.memory_allocated() - weights
                dt = decode_graph(model, cache, b, steps)
                del cache
                torch.cuda.empty_cache()
                best[(name, decode)] = min(best.get((name, decode), (dt, kv)), (dt, kv))
                print(name, decode, f"{1e3 * dt:.2f} ms/step", flush=True)
    peak = 3.35e12
    lines = [f"# Decode steps by attention kernel, B = {b}, {ctx}-token context (Llama-3.1-8B shape, 32 layers)", "",
             provenance(), f"Command: `python benchmarks/ab_decode_kernels.py {' '.join(sys.argv[1:])}`; each "
             f"quantized row is the best of {args.repeats} alternating runs of {steps} steps (StaticDecoder), the bf16 "
             f"row the best of {args.repeats}.", "",
             "| config | kernel | ms/step | vs strong bf16 step | share of HBM peak (weights + KV read once) |",
             "|---|---|---|---|---|",
             f"| bf16, strong baseline | flash SDPA | {1e3 * bf16:.2f} | 1.00x | "
             f"{(weights + strong_bf16.kv_bytes(model, b, ctx)) / bf16 / peak:.0%} |"]
    for (name, decode), (dt, kv) in best.items():
        lines.append(f"| {name} | {decode} | {1e3 * dt:.2f} | {dt / bf16:.2f}x | {(weights + kv) / dt / peak:.0%} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
