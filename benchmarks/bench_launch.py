"""Host cost of one fused decode-attention call, with and without the cached launch path.

    PYTHONPATH=src python benchmarks/bench_launch.py --out benchmarks/results/launch_overhead_h100.md

Llama-3.1-8B layer shape (Hq=32, Hkv=8, head_dim=128, bf16, KIVI G=128, 32-token residual) at batch
1 and 1,024 tokens, where the GPU work is a few µs and the host is the bound. ``host`` is the
wall time per call over 2,000 back-to-back calls without synchronising (the GPU queue absorbs the
kernels), ``GPU`` the time of the same call in a CUDA graph (no host work). With the cached path
off, every call goes through ``kernel[grid](...)`` (Triton's argument binding and
specialisation); on, calls after the first reuse the compiled binary (``kernels/launch.py``).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import triton
import triton.testing
from bench_attention import D, packed_case

from kvtuner.kernels import triton_decode as td

CALLS = 2000


def host_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):  # best of three: the device's host is shared and its noise only adds time
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        best = min(best, 1e6 * (t1 - t0) / CALLS)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="88,44,42,33,22")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for pair in args.pairs.split(","):
        kb, vb = int(pair[0]), int(pair[1])
        q, kp, kr, vp, vr = packed_case(1, 1024, kb, vb, 128)

        def fn(q=q, kp=kp, kr=kr, vp=vp, vr=vr):
            return td.decode_attention(q, kp, kr, vp, vr, D**-0.5)

        times = {}
        for on in (False, True):
            td._launch_split.enabled = td._launch_merge.enabled = on
            times[on] = host_us(fn)
        td._launch_split.enabled = td._launch_merge.enabled = True
        gpu = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
        rows.append((f"K{kb}V{vb}", times[False], times[True], gpu))
        print(rows[-1], flush=True)
    lines = [f"# Host cost per decode_attention call ({torch.cuda.get_device_name()})", "",
             (f"torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}; "
              "command: `PYTHONPATH=src python benchmarks/bench_launch.py --out "
              "benchmarks/results/launch_overhead_h100.md`"), "",
             "B = 1, 1,024 quantized tokens + 32 residual, Llama-3.1-8B layer shape; µs per call.", "",
             "| pair | host, Triton's launch | host, cached launch | GPU (in a CUDA graph) |", "|---|---|---|---|"]
    lines += [f"| {n} | {a:.1f} | {b:.1f} | {g:.1f} |" for n, a, b, g in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
