"""A/B on the GPU: the Gluon decode kernel (``kvtuner/kernels/gluon_decode.py``) against the Triton split
kernel and bf16 SDPA, one decode-attention layer at Llama-3.1-8B shape (Hq 32, Hkv 8, D 128), KIVI G = 32,
the packed history (in the layout the cache gives each kernel's layers) plus a 32-token bf16 residual window;
every output against the PyTorch reference.

    PYTHONPATH=src python benchmarks/ab_gluon_decode.py [--pairs 88,44,42,22,43] [--shapes 64x4096,1x131072]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, "benchmarks")
from provenance import hbm_peak, provenance  # noqa: E402

from kvtuner import kernels, quant  # noqa: E402
from kvtuner.attention import decode_attention as reference  # noqa: E402
from kvtuner.kernels import gluon_decode  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="88,44,42,22,43")
    ap.add_argument("--shapes", default="64x4096,1x131072")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    hkv, group, d = 8, 4, 128
    peak = hbm_peak()
    lines = [provenance(), f"Triton {triton.__version__}; HBM peak {peak / 1e12:.2f} TB/s", "",
             "| B x L | config | µs in graph | TB/s | share of HBM peak | rel. error vs reference |",
             "|---|---|---|---|---|---|"]

    def row(shape, name, us, nbytes, err=None):
        tbs = nbytes / us / 1e6
        lines.append(f"| {shape} | {name} | {us:.1f} | {tbs:.2f} | {tbs * 1e12 / peak:.0%} | "
                     f"{'' if err is None else f'{err:.2e}'} |")
        print(lines[-1], flush=True)

    for shape in args.shapes.split(","):
        b, n = (int(x) for x in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k += torch.randn(1, 1, 1, d, device="cuda", dtype=torch.bfloat16, generator=g) * 3
        v = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        q = torch.randn(b, hkv * group, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
        kr = torch.randn(b, hkv, 32, d, device="cuda", dtype=torch.bfloat16, generator=g)
        vr = torch.randn(b, hkv, 32, d, device="cuda", dtype=torch.bfloat16, generator=g)
        scaling = d ** -0.5
        for pair in args.pairs.split(","):
            kbits, vbits = int(pair[0]), int(pair[1])
            kp = quant.quantize(k, kbits, "per_channel", 32)
            vp = quant.quantize(v, vbits, "per_token", 32)
            want = reference(q.float(), kp, kr.float(), vp, vr.float(), scaling)
            kw, vw = quant.in_channel_words(kp), quant.in_token_pairs(vp)  # the cache's layout for Gluon layers
            nbytes = kp.nbytes() + vp.nbytes() + 2 * kr.numel() * 2 + q.numel() * 2
            for stages in (0, 2 if max(kbits, vbits) == 8 else 3):
                fn = lambda: gluon_decode.decode_attention(q, kw, kr, vw, vr, scaling, stages=stages)
                name = "tiles loaded into registers" if not stages else f"cp.async ring of {stages} tiles"
                row(shape, f"K{kbits}V{vbits} Gluon kernel, {name}", bench(fn), nbytes, rel(fn(), want))
            fn = lambda: kernels.decode_attention(q, kp, kr, vp, vr, scaling)
            row(shape, f"K{kbits}V{vbits} Triton kernel", bench(fn), nbytes, rel(fn(), want))
            del kp, vp, kw, vw
            torch.cuda.empty_cache()
        best = None
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
                    us = bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True))
            except RuntimeError as e:
                print(f"  SDPA {backend}: {str(e).splitlines()[0]}", file=sys.stderr)
                continue
            best = min(best or (us, backend), (us, backend))
        if best:
            row(shape, f"bf16 SDPA ({best[1].lower()})", best[0], 2 * k.numel() * 2 + q.numel() * 2)
        del k, v
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
