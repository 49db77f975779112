"""One decode-attention layer at Llama-3.1-8B shape: fused Triton kernel over packed KV vs bf16 SDPA.

    python benchmarks/bench_attention.py --out benchmarks/results/h100/attention_g32.md --groups 32

Hq=32, Hkv=8, head_dim=128, bf16; batch {1, 16, 64} x context {4k, 32k, 128k} where it fits.
KIVI layout (keys per channel in groups of G tokens, values per token), G = 128 (one value
scale per token and head) and G = 32 (the plan default), plus a 32-token bf16 residual window.
``--rotation`` adds each pair with a Hadamard-rotated layer (query rotated in, output rotated
back, as ``QuantizedKVLayer.fused_decode`` does). 3- and 6-bit pairs are bit-plane codes. Times are medians of ``triton.testing.do_bench`` (L2 flushed between runs); effective TB/s counts
every byte the step must read (codes + scales/zeros + residual + q/out).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import triton
import triton.testing
from provenance import hbm_peak, provenance

from kvtuner import KernelPolicy, kernels, quant
from kvtuner.attention import rotated_decode
from kvtuner.spec import QuantSpec

HQ, HKV, D = 32, 8, 128
PAIRS = [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2)]
RESIDUAL = 32
LAST_LAUNCH: dict = {}  # the last split kernel compiled (registers, spills, shared memory)
POLICY = KernelPolicy("triton")  # the layouts MixedPrecisionCache chooses on the GPU (--value-layout, --planes3 force others)


def warm(fn, seconds: float = 0.25) -> None:
    """Run ``fn`` back to back for a while before timing it: after seconds of compiling on the CPU the
    GPU has clocked down, and the first eager timing of a config then read up to 2x too slow (H100:
    K4V4 305-442 µs right after its compile, 207-210 µs in every later measurement)."""
    fn()
    torch.cuda.synchronize()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()


def sdpa_us(b: int, n: int) -> tuple[float, str]:
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = (float("inf"), "")
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        if name == "math" and b * n > 16 * 32768:
            continue
        try:
            with sdpa_kernel(be):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
                warm(fn)
                t = triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3
            best = min(best, (t, name))
        except RuntimeError:
            continue
    return best


def cache_layout(kbits: int, vbits: int, g: int) -> tuple[int, bool, bool]:
    """(values' token block, keys in word order, values in word order) as a cache with :data:`POLICY` lays
    out a KIVI layer of this pair and group on the GPU (``KernelPolicy.layout``)."""
    kspec, vspec = QuantSpec(kbits, "kivi", g, RESIDUAL), QuantSpec(vbits, "kivi", g, RESIDUAL)
    lay = POLICY.layout(kspec, vspec, D, torch.device("cuda"))
    return lay.value_block, lay.key_words, lay.value_words


def packed_case(b: int, n: int, kbits: int, vbits: int, g: int):
    kp_parts, vp_parts = [], []
    vt, kwords, vwords = cache_layout(kbits, vbits, g)
    for i in range(b):  # per sequence, so bf16 temporaries and the re-layout's int32 codes stay small
        k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16)
        k += torch.randn(1, 1, 1, D, device="cuda", dtype=torch.bfloat16) * 2
        v = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16)
        kp_i = kernels.quantize(k, kbits, "per_channel", g)
        vp_i = kernels.quantize(v, vbits, "per_token", g if g < D else None)
        if vt:
            vp_i = quant.in_token_blocks(vp_i, vt)
        if kwords:
            kp_i = quant.in_channel_words(kp_i)
        if vwords:
            vp_i = quant.in_channel_words(vp_i)
        kp_parts.append(kp_i)
        vp_parts.append(vp_i)
        del k, v
    kp, vp = quant.cat(kp_parts, dim=0), quant.cat(vp_parts, dim=0)
    del kp_parts, vp_parts
    kr = torch.randn(b, HKV, RESIDUAL, D, device="cuda", dtype=torch.bfloat16)
    vr = torch.randn_like(kr)
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    return q, kp, kr, vp, vr


def bytes_read(q, kp, kr, vp, vr) -> int:
    return kp.nbytes() + vp.nbytes() + 2 * kr.numel() * 2 + 2 * q.numel() * 2


def run_kernel(case, rotation: bool = False, cudagraph: bool = False, **kw) -> float:
    q, kp, kr, vp, vr = case

    def kernel(*a, **call):  # what the cache calls; rotated layers pass rotate_q / rotate_out
        return kernels.decode_attention(*a, **call, **kw, launch_info=LAST_LAUNCH)

    kernel.fuses_rotation = True

    if rotation:  # what a rotated layer adds (QuantizedKVLayer.fused_decode): Hadamard transforms in the kernels
        fn = lambda: rotated_decode(kernel, q, kp, kr, vp, vr, D**-0.5, None, True, True)  # noqa: E731
    else:
        fn = lambda: kernel(q, kp, kr, vp, vr, D**-0.5, None)  # noqa: E731
    warm(fn)
    if cudagraph:  # GPU time only: no Python launch gaps
        return triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3


def tune(case, g: int) -> dict:
    best = (float("inf"), {})
    for block_n in sorted({g, 64, 128}):
        for warps in ((4, 8) if block_n >= 64 else (4,)):  # 8 warps on a 32-token tile crashed (Triton 3.6)
            for stages in (2, 3):
                kw = dict(block_n=block_n, num_warps=warps, num_stages=stages)
                try:
                    best = min(best, (run_kernel(case, **kw), kw), key=lambda x: x[0])
                except Exception as e:  # a variant that fails to compile or launch is skipped, not fatal
                    print("skip", kw, type(e).__name__, str(e)[:80], flush=True)
    return best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/attention_gpu.md")
    ap.add_argument("--json", default=None)
    ap.add_argument("--groups", default="128,32")
    ap.add_argument("--quick", action="store_true", help="B=64, L=4096 only")
    ap.add_argument("--pairs", default=",".join(f"{k}{v}" for k, v in PAIRS), help="k then v bits, e.g. 44,43,33")
    ap.add_argument("--shapes", default=None, help="BxL list, e.g. 64x4096,1x131072 (overrides --quick)")
    ap.add_argument("--rotation", action="store_true", help="also time each pair with Hadamard rotation")
    ap.add_argument("--cudagraph", action="store_true", help="also time each config inside a CUDA graph")
    ap.add_argument("--tune", action="store_true", help="sweep tile/warps/stages per pair at the first shape "
                    "(default: the kernel's launch defaults, from sweep_decode_kernel.py)")
    ap.add_argument("--mixed", action="store_true", help="also time KVTuner-C3.25's 32 layers back to back at "
                    "B=64, L=4096 against the sum of its layers' single-layer times")
    ap.add_argument("--planes3", action="store_true", help="3-bit codes in two bit planes (KernelPolicy(words3="
                    "'off')); default: as the cache stores them (contiguous words)")
    ap.add_argument("--value-layout", default="cache", choices=["cache", "channels"],
                    help="cache: codes as the cache stores them on the GPU (token blocks for KIVI values of 2-4 "
                    "bits at G=128, 4-bit keys beside them in word order); channels: codes always packed along "
                    "head_dim (KernelPolicy(value_token_blocks='off'))")
    args = ap.parse_args()
    global POLICY
    POLICY = KernelPolicy("triton", value_token_blocks="off" if args.value_layout == "channels" else "auto",
                          words3="off" if args.planes3 else "auto")
    pairs = [(int(x[0]), int(x[1])) for x in args.pairs.split(",")]
    t_start = time.time()
    props = torch.cuda.get_device_properties(0)
    peak = hbm_peak(props.name)
    free = torch.cuda.mem_get_info()[0]
    shapes = [(64, 4096), (16, 32768), (1, 131072), (1, 4096)] if args.quick else [(64, 4096)] + [(b, n) for b in (1, 16, 64) for n in (4096, 32768, 131072) if (b, n) != (64, 4096)]
    if args.shapes:
        shapes = [tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")]
    groups = [int(x) for x in args.groups.split(",")]
    rows, tuned = [], {}
    for b, n in shapes:
        fp_bytes = 2 * b * HKV * n * D * 2
        if 1.15 * fp_bytes > free:
            rows.append(dict(batch=b, context=n, config="bf16 SDPA", note="does not fit"))
            continue
        t_sdpa, backend = sdpa_us(b, n)
        torch.cuda.empty_cache()
        rows.append(dict(batch=b, context=n, config=f"bf16 SDPA ({backend})", us=t_sdpa,
                         tbps=(fp_bytes + 4 * b * HQ * D) / t_sdpa / 1e6, speedup=1.0))
        print(rows[-1], flush=True)
        for g in groups:
            for kb, vb in pairs:
                case = packed_case(b, n, kb, vb, g)
                key = (kb, vb, g)
                if key not in tuned:
                    tuned[key] = tune(case, g) if args.tune else {}
                for rot in ((False, True) if args.rotation else (False,)):
                    t = run_kernel(case, rotation=rot, **tuned[key])
                    t_graph = run_kernel(case, rotation=rot, cudagraph=True, **tuned[key]) if args.cudagraph else None
                    ck = LAST_LAUNCH.get("split")
                    res = dict(regs=getattr(ck, "n_regs", None), spills=getattr(ck, "n_spills", None),
                               smem=getattr(getattr(ck, "metadata", None), "shared", None))
                    rows.append(dict(batch=b, context=n, config=f"K{kb}V{vb} G{g}" + (" rotated" if rot else ""),
                                     us=t, tbps=bytes_read(*case) / t / 1e6, speedup=t_sdpa / t,
                                     us_graph=t_graph, launch={**tuned[key], **res}))
                    print(rows[-1], flush=True)
                del case
                torch.cuda.empty_cache()
                write(args, props, rows, t_start, peak)
    if args.mixed:
        rows.append(mixed_plan_row())
        print(rows[-1], flush=True)
    write(args, props, rows, t_start, peak)


def mixed_plan_row(b: int = 64, n: int = 4096) -> dict:
    """KVTuner-C3.25 (the paper's Llama-3.1-8B plan) as 32 layers, each with its own packed cache:
    the layers called back to back vs the sum of each pair's single-layer time x its layer count."""
    from bench_decode import C325

    pairs = [C325.get(i, (4, 2)) for i in range(32)]
    single, single_graph = {}, {}
    for pair in sorted(set(pairs)):
        case = packed_case(b, n, *pair, 128)
        single[pair] = run_kernel(case)
        single_graph[pair] = run_kernel(case, cudagraph=True)
        del case
        torch.cuda.empty_cache()
    cases = [packed_case(b, n, *pair, 128) for pair in pairs]

    def step():
        for q, kp, kr, vp, vr in cases:
            kernels.decode_attention(q, kp, kr, vp, vr, D**-0.5, None)

    warm(step)
    t_step = triton.testing.do_bench(step, warmup=3, rep=200) * 1e3
    t_graph = triton.testing.do_bench_cudagraph(step, rep=200) * 1e3
    predicted = sum(single[p] for p in pairs)
    # eager single-layer times each carry the host's launch latency, which a step of 32 back-to-back
    # layers hides: the graph times compare GPU time with GPU time
    predicted_graph = sum(single_graph[p] for p in pairs)
    return dict(batch=b, context=n, config="C3.25 mixed, 32 layers", us=t_step, us_graph=t_graph,
                tbps=sum(bytes_read(*c) for c in cases) / t_step / 1e6, speedup=float("nan"),
                launch={"sum of single-layer times (us)": round(predicted, 1),
                        "step / sum": round(t_step / predicted, 3),
                        "sum of single-layer graph times (us)": round(predicted_graph, 1),
                        "graph step / graph sum": round(t_graph / predicted_graph, 3),
                        "per pair (us)": {f"K{k}V{v}": round(t, 1) for (k, v), t in single.items()},
                        "per pair in graph (us)": {f"K{k}V{v}": round(t, 1) for (k, v), t in single_graph.items()}})


def write(args, props, rows, t_start, peak) -> None:
    head = [f"# Decode attention, one layer, Llama-3.1-8B shape (Hq={HQ}, Hkv={HKV}, D={D}, bf16)", "",
            f"{provenance()}; GPU: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton "
            f"{triton.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}.",
            f"Command: `python benchmarks/bench_attention.py --out {args.out}"
            f"{' --quick' if args.quick else ''} --pairs {args.pairs} --groups {args.groups}"
            f"{' --shapes ' + args.shapes if args.shapes else ''}{' --rotation' if args.rotation else ''}"
            f"{' --cudagraph' if args.cudagraph else ''}{' --tune' if args.tune else ''}"
            f"{' --mixed' if args.mixed else ''}{' --planes3' if args.planes3 else ''}"
            f"{' --value-layout ' + args.value_layout}` "
            f"({time.time() - t_start:.0f} s).",
            "Values: " + ("as the cache stores them on the GPU: KIVI values of 2-4 bits in token blocks of one "
                          "group (quant.to_token_blocks) when G = 128, 4-bit keys beside them in channel word order "
                          "(quant.to_channel_words); otherwise packed along head_dim"
                          + ("; 3-bit keys and values packed along head_dim as contiguous words (KernelPolicy.words3)."
                             if POLICY.words3 != "off" else "; 3-bit codes in two bit planes (--planes3).")
                          if args.value_layout == "cache" else "packed along head_dim for every pair."),
            "KIVI layout: keys per channel in groups of G tokens, values per token (G=128: one scale/zero per "
            "token and head; G=32: four), plus a 32-token bf16 residual window read by the same launch. "
            "µs = median of triton.testing.do_bench (L2 flushed), each config after 0.25 s of back-to-back calls "
            "(the GPU clocks down while the next config compiles); TB/s = bytes the step must read / time; "
            f"share of HBM peak = TB/s / {peak / 1e12:.2f} TB/s (provenance.HBM_PEAK); "
            "speed-up vs the fastest bf16 SDPA backend at that shape. Launch: the kernel's defaults per pair "
            "(kernels.launch_defaults), or with --tune a sweep per (pair, G) at the first shape.", "",
            "µs in graph: the same call captured in a CUDA graph (do_bench_cudagraph), i.e. GPU time without "
            "Python launch gaps (--cudagraph).", "",
            "| batch | context | config | µs | µs in graph | eff. TB/s | share of HBM peak | vs bf16 SDPA | launch |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "us" not in r:
            head.append(f"| {r['batch']} | {r['context']} | {r['config']} | {r['note']} | | | | | |")
            continue
        graph = f"{r['us_graph']:.1f}" if r.get("us_graph") else ""
        head.append(f"| {r['batch']} | {r['context']} | {r['config']} | {r['us']:.1f} | {graph} | {r['tbps']:.2f} | "
                    f"{r['tbps'] * 1e12 / peak:.0%} | "
                    f"{'' if r['speedup'] != r['speedup'] else format(r['speedup'], '.2f') + 'x'} | {r.get('launch', '')} |")
    text = "\n".join(head) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
