"""A/B timing of decode-kernel launch variants at B=64, L=4096 (Llama-3.1-8B shape, KIVI G=128).

    PYTHONPATH=src python benchmarks/ab_decode_variants.py

For each pair, every variant (overrides of triton_decode.launch_defaults) is checked against the
fp32 reference and timed eagerly (do_bench) and inside a CUDA graph (do_bench_cudagraph).
Results: benchmarks/results/kernel_experiments_h100.md.
"""
import sys, torch, triton.testing as tt
sys.path.insert(0, "benchmarks")
from bench_attention import packed_case, D
from kvtuner.kernels import triton_decode as td
from kvtuner.attention import decode_attention as ref
V = {"33": [{}, {"swap_pv": True}, {"splits_per_sm": 8}, {"fold_k": "reg"}, {"num_stages": 2}],
     "43": [{}, {"swap_pv": False}, {"splits_per_sm": 8}], "34": [{}], "32": [{}],
     "44": [{}, {"splits_per_sm": 3}], "22": [{}]}
for pair, vs in V.items():
    case = packed_case(64, 4096, int(pair[0]), int(pair[1]), 128)
    q, kp, kr, vp, vr = case
    r = ref(q.float(), kp, kr.float(), vp, vr.float(), D**-0.5).float()
    for v in vs:
        try:
            fn = lambda: td.decode_attention(q, kp, kr, vp, vr, D**-0.5, **v)
            err = ((fn().float() - r).norm() / r.norm()).item()
            g = tt.do_bench_cudagraph(fn, rep=100) * 1e3
            e = tt.do_bench(fn, warmup=10, rep=100) * 1e3
            ck = td.last_compiled
            print(f"K{pair[0]}V{pair[1]} {v} graph {g:.1f} eager {e:.1f} err {err:.1e} regs {ck.n_regs} spills {ck.n_spills}", flush=True)
        except Exception as ex:
            print(pair, v, "ERR", str(ex)[:150], flush=True)
