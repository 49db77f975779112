"""Launch sweep of the Gluon decode kernel on the GPU: programs per SM (the split count), a register cap
(more resident programs) and the cp.async ring's depth, one layer at Llama-3.1-8B shape (Hq 32, Hkv 8, D 128),
KIVI G = 32, values in token pairs (``--as-stored``: packed along head_dim), a 32-token residual window; µs
in a CUDA graph, each output checked against the reference.

    PYTHONPATH=src python benchmarks/sweep_gluon_launch.py [--pairs 44,22] [--shapes 1x131072,64x4096]
        [--launches none/2,168/3,168/9/3,...]   (maxnreg/programs per SM[/stages])
"""

from __future__ import annotations

import argparse

import torch
import triton

from kvtuner import quant
from kvtuner.attention import decode_attention as reference
from kvtuner.kernels.gluon_decode import decode_packed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="44,22")
    ap.add_argument("--shapes", default="1x131072,64x4096")
    ap.add_argument("--launches", default="none/2,168/3,168/2,none/4,168/6",
                    help="maxnreg/programs per SM[/pipeline stages, 0: plain loads], ...")
    ap.add_argument("--as-stored", action="store_true", help="values packed along head_dim (not in token pairs)")
    args = ap.parse_args()
    hkv, group, d = 8, 4, 128
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for shape in args.shapes.split(","):
        b, n = (int(x) for x in shape.split("x"))
        k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, hkv * group, 1, d, device="cuda", dtype=torch.bfloat16)
        kr = torch.randn(b, hkv, 32, d, device="cuda", dtype=torch.bfloat16)
        for pair in args.pairs.split(","):
            kb, vb = int(pair[0]), int(pair[1])
            kp = quant.in_channel_words(quant.quantize(k, kb, "per_channel", 32))
            vp = quant.quantize(k, vb, "per_token", 32)
            vw = vp if args.as_stored else quant.in_token_pairs(vp)
            vc, vs, vz = vw.codes, vw.scale, vw.zero
            want = reference(q.float(), kp, kr.float(), vp, kr.float(), d ** -0.5)
            out = []
            for launch in args.launches.split(","):
                reg, per_sm, *stages = launch.split("/")
                mr = None if reg == "none" else int(reg)
                st = int(stages[0]) if stages else None
                f = lambda: decode_packed(q, kp.codes, kp.scale, kp.zero, vc, vs, vz, d ** -0.5, kb, vb, kr, kr,
                                          programs_per_sm=int(per_sm), maxnreg=mr, stages=st,
                                          value_pairs=not args.as_stored)
                err = ((f().float() - want).norm() / want.norm()).item()
                torch.cuda.synchronize()
                out.append(f"{launch}: {triton.testing.do_bench_cudagraph(f, rep=50) * 1e3:.1f} µs (err {err:.1e})")
            print(shape, f"K{kb}V{vb}", " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
