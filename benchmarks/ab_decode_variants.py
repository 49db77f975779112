"""A/B timing of decode-kernel launch variants (Llama-3.1-8B shape, KIVI G=128 or --group, 32-token residual).

    PYTHONPATH=src python benchmarks/ab_decode_variants.py --pairs 44,42 --shapes 64x4096,1x131072 \
        --variants '[{}, {"splits_per_sm": 3}]'

For each pair and shape, every variant (overrides of kvtuner.kernels.launch_defaults; ``{}`` is the
current default) is checked against the fp32 reference and timed eagerly (do_bench) and inside a
CUDA graph (do_bench_cudagraph). Two keys change the cases instead of the launch:
``"token_block": G`` stores the values in token blocks of G tokens (quant.in_token_blocks, as the
cache does on the GPU for KIVI values of 2-4 bits at G = 128; otherwise they are packed along
head_dim), ``"key_words": true`` the keys in channel word order (quant.in_channel_words), ``"value_words":
true`` the values (3 bits, packed along head_dim: contiguous words).
What each table entry was chosen from: docs/kernels.md.
"""

import argparse
import json
import sys

import torch
import triton.testing as tt

sys.path.insert(0, "benchmarks")
import bench_attention  # noqa: E402
from bench_attention import D, packed_case  # noqa: E402

from kvtuner import quant  # noqa: E402
from kvtuner.attention import decode_attention as ref  # noqa: E402
from kvtuner import KernelPolicy, kernels  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--pairs", default="44")
ap.add_argument("--shapes", default="64x4096")
ap.add_argument("--variants", default="[{}]")
ap.add_argument("--group", type=int, default=128, help="KIVI group G (keys per channel over G tokens, values per "
                "token over G channels; 32 is the plans' default)")
ap.add_argument("--scale-dtype", default=None, choices=["float16", "bfloat16"],
                help="store the cases' scales/zeros in this dtype (default: quant.meta_dtype, fp16 for this bf16 model)")
args = ap.parse_args()
bench_attention.POLICY = KernelPolicy("triton", value_token_blocks="off", words3="off")  # cases start packed along head_dim; a variant re-lays them
for shape in args.shapes.split(","):
    b, n = (int(x) for x in shape.split("x"))
    for pair in args.pairs.split(","):
        case = packed_case(b, n, int(pair[0]), int(pair[1]), args.group)
        q, kp, kr, vp, vr = case
        if args.scale_dtype:  # metadata dtype experiment: codes unchanged, scales/zeros cast
            dt = getattr(torch, args.scale_dtype)
            kp, vp = (x.__class__(x.codes, x.scale.to(dt), x.zero.to(dt), *[getattr(x, f) for f in
                      ("bits", "granularity", "group_size", "head_dim")]) for x in (kp, vp))
        r = ref(q.float(), kp, kr.float(), vp, vr.float(), D**-0.5).float()
        for v in json.loads(args.variants):
            try:
                launch = dict(v)
                vpx = vp
                if launch.get("token_block"):  # values re-laid in token blocks (quant.to_token_blocks)
                    tb = launch.pop("token_block")
                    vpx = quant.in_token_blocks(vp, tb)
                launch.pop("token_block", None)
                kpx = kp
                if launch.pop("key_words", False):  # keys in channel word order (quant.to_channel_words)
                    kpx = quant.in_channel_words(kp)
                if launch.pop("value_words", False):  # 3-bit values as contiguous words (quant.to_channel_words)
                    vpx = quant.in_channel_words(vpx)
                info = {}
                fn = lambda: kernels.decode_attention(q, kpx, kr, vpx, vr, D**-0.5, **launch, launch_info=info)  # noqa: E731
                err = ((fn().float() - r).norm() / r.norm()).item()
                g = tt.do_bench_cudagraph(fn, rep=100) * 1e3
                e = tt.do_bench(fn, warmup=10, rep=100) * 1e3
                ck = info["split"]
                print(f"{shape} K{pair[0]}V{pair[1]} {v} graph {g:.1f} eager {e:.1f} err {err:.1e} "
                      f"regs {ck.n_regs} spills {ck.n_spills}", flush=True)
            except Exception as ex:  # a variant that does not compile or run is a result too
                print(shape, pair, v, "ERR", str(ex)[:150], flush=True)
        vpx = kpx = None  # let the re-laid copies go with the case
        del case, q, kp, kr, vp, vr, r
        torch.cuda.empty_cache()
