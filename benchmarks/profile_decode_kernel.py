"""Where a decode-attention launch spends its time (Llama-3.1-8B shape, KIVI G=128, 32-token residual).

    # timing under four measurement methods, per pair, plus bf16 SDPA
    PYTHONPATH=src python benchmarks/profile_decode_kernel.py time --pairs 44,33,22,88
    # one launch of the split kernel per pair, for Nsight Compute
    ncu --clock-control none -k regex:_decode_split_kernel --launch-skip 2 --launch-count 1 \
        PYTHONPATH=src python benchmarks/profile_decode_kernel.py once --pairs 44
    # static SASS opcode histogram of the split kernel per pair
    PYTHONPATH=src python benchmarks/profile_decode_kernel.py sass --pairs 44,33

Timing methods (µs per call, median): ``flush-write`` = triton.testing.do_bench (zeroes a 256 MB
buffer before each call, so the call starts with an L2 full of dirty lines that must be written
back while it runs); ``flush-read`` = the same loop, but the buffer is read (summed) instead: the
L2 holds clean lines, as after the weight-reading matmuls that precede attention in a model;
``no-flush`` = back to back eager calls; ``graph`` = do_bench_cudagraph (no flush, no launch gaps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing as tt

sys.path.insert(0, "benchmarks")
from bench_attention import HKV, HQ, D, packed_case, warm
from compile_offline import sass_summary

from kvtuner import kernels

LAST: dict = {}  # the last split kernel compiled


def timed(fn, flush: str, reps: int = 50) -> float:
    """Median µs of ``fn`` over ``reps`` calls, each preceded by the given L2 treatment."""
    buf = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    sink = torch.empty((), dtype=torch.int64, device="cuda")
    warm(fn)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        if flush == "write":
            buf.zero_()
        elif flush == "read":
            sink.copy_(buf.sum())
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in ev)[reps // 2] * 1e3


def sdpa_fn(b: int, n: int):
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return fn


def kernel_fn(b: int, n: int, pair: str):
    q, kp, kr, vp, vr = packed_case(b, n, int(pair[0]), int(pair[1]), 128)
    return lambda: kernels.decode_attention(q, kp, kr, vp, vr, D**-0.5, launch_info=LAST)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["time", "once", "sass"])
    ap.add_argument("--pairs", default="44")
    ap.add_argument("--shape", default="64x4096")
    ap.add_argument("--sass-dir", default=None, help="sass mode: also write each kernel's SASS here")
    args = ap.parse_args()
    b, n = (int(x) for x in args.shape.split("x"))
    if args.mode == "time":
        print("| config | flush-write | flush-read | no-flush | graph |\n|---|---|---|---|---|")
        fns = [("bf16 SDPA (cuDNN)", sdpa_fn(b, n))] + [(f"K{p[0]}V{p[1]}", kernel_fn(b, n, p))
                                                         for p in args.pairs.split(",")]
        for name, fn in fns:
            row = [timed(fn, "write"), timed(fn, "read"), timed(fn, "none"), tt.do_bench_cudagraph(fn, rep=100) * 1e3]
            print(f"| {name} | " + " | ".join(f"{x:.1f}" for x in row) + " |", flush=True)
        return
    for pair in args.pairs.split(","):
        fn = kernel_fn(b, n, pair)
        for _ in range(3):  # compile, warm, then the profiled launch (--launch-skip 2)
            fn()
        torch.cuda.synchronize()
        if args.mode == "sass":
            sass, ops, usage = sass_summary(LAST["split"])
            if args.sass_dir:
                Path(args.sass_dir, f"K{pair[0]}V{pair[1]}.sass").write_text(sass)
            print(f"K{pair[0]}V{pair[1]} {usage}, instructions {sum(ops.values())}: "
                  + ", ".join(f"{k} {v}" for k, v in ops.most_common(28)), flush=True)


if __name__ == "__main__":
    main()
