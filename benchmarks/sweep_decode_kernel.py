"""Sweep the fused decode kernel's launch choices per bit pair: MMA orientation, PTX unpacking,
warps, stages and tile, at Llama-3.1-8B shape (Hq=32, Hkv=8, D=128, bf16, KIVI G=128).

    python benchmarks/sweep_decode_kernel.py --out benchmarks/results/h100/decode_kernel_sweep.md

Stage A times the 8 (swap_qk, swap_pv, asm) variants at 4 and 8 warps; stage B sweeps stages and
tile for the best of them. Every variant is checked against the fp32 reference before it is timed
(relative error must stay below 2e-3). Each pair runs in its own process: an illegal memory access
kills the CUDA context, so the driver restarts the pair without the variant that crashed and
records the crash.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time

SHAPE_MAIN = (64, 4096)
SHAPE_LONG = (1, 131072)
PAIRS = "88,84,44,43,42,33,22"


def variant_key(v: dict) -> str:
    return ",".join(f"{k}={int(x) if isinstance(x, bool) else x}" for k, x in sorted(v.items()))


def child(pair: str, skip: set[str], stage: str = "launch") -> None:
    import torch
    import triton.testing

    sys.path.insert(0, "benchmarks")
    import bench_attention
    from bench_attention import D, packed_case

    # the table's "k,v" entries are for codes packed along head_dim; token-blocked layouts have their
    # own "k,v,tokens" entries (measured with ab_decode_variants.py --variants '[{"token_block":128}]')
    from kvtuner import KernelPolicy

    bench_attention.POLICY = KernelPolicy("triton", value_token_blocks="off")

    from kvtuner.attention import decode_attention as reference
    from kvtuner import kernels

    kb, vb = int(pair[0]), int(pair[1])

    def emit(**row):
        print("ROW " + json.dumps(row), flush=True)

    def measure(case, ref, v, shape):
        key = variant_key(v)
        if key in skip:
            return None
        print("TRY " + json.dumps(dict(pair=pair, shape=shape, variant=v)), flush=True)
        q, kp, kr, vp, vr = case
        info = {}
        try:
            fn = lambda: kernels.decode_attention(q, kp, kr, vp, vr, D**-0.5, None, **v, launch_info=info)  # noqa: E731
            out = fn()
            torch.cuda.synchronize()
        except Exception as e:  # compile error or out of resources: a fact about the variant, not fatal
            if "illegal" in str(e) or "CUDA error" in str(e):  # the context is dead: the driver restarts us
                print(f"DEAD {type(e).__name__}: {str(e)[:160]}", flush=True)
                os._exit(3)
            emit(pair=pair, shape=shape, variant=v, error=f"{type(e).__name__}: {str(e)[:120]}")
            return None
        err = ((out.float() - ref).norm() / ref.norm()).item()
        ck = info.get("split")
        us = triton.testing.do_bench(fn, warmup=10, rep=60) * 1e3 if err < 2e-3 else None
        row = dict(pair=pair, shape=shape, variant=v, us=us, rel_err=err, regs=getattr(ck, "n_regs", None),
                   spills=getattr(ck, "n_spills", None), smem=getattr(getattr(ck, "metadata", None), "shared", None))
        emit(**row)
        return row

    def ref_of(case):
        q, kp, kr, vp, vr = case
        return reference(q.float(), kp, kr.float(), vp, vr.float(), D**-0.5, None).float()

    b, n = SHAPE_MAIN
    case = packed_case(b, n, kb, vb, 128)
    ref = ref_of(case)
    rows = []
    if stage in ("fold", "combine", "warps"):
        dict(fold=fold_stage, combine=combine_stage, warps=warps_stage)[stage](case, ref, measure, kb, vb)
        del case, ref
        torch.cuda.empty_cache()
        return
    for sq, sp, asm in itertools.product((False, True), repeat=3):
        r = measure(case, ref, dict(swap_qk=sq, swap_pv=sp, asm=asm, num_warps=4, num_stages=3, block_n=128),
                    "64x4096")
        if r and r["us"]:
            rows.append(r)
    if not rows:
        return
    best = min(rows, key=lambda r: r["us"])["variant"]
    # 8 warps were 40-90 % slower in every case of the first sweep: tried once, not crossed
    for stages, block_n, warps in ((2, 128, 4), (4, 128, 4), (3, 64, 4), (3, 128, 8)):
        v = {**best, "num_stages": stages, "block_n": block_n, "num_warps": warps}
        r = measure(case, ref, v, "64x4096")
        if r and r["us"]:
            rows.append(r)
    best = min(rows, key=lambda r: r["us"])["variant"]
    base = dict(swap_qk=False, swap_pv=False, asm=False)
    default_launch = {k: x for k, x in rows[0]["variant"].items() if k not in base}
    del case, ref
    torch.cuda.empty_cache()
    b, n = SHAPE_LONG
    case = packed_case(b, n, kb, vb, 128)
    ref = ref_of(case)
    for v in (best, {**base, **default_launch}, {**best, "num_stages": 2}):
        measure(case, ref, v, "1x131072")


FOLD_GRID = (("plain", "reg"), ("plain", "plain"), ("reg", "reg"), ("reg", "norm"), ("reg", "plain"))
FOLD_EXTRAS = (dict(maxnreg=168), dict(maxnreg=128), dict(maxnreg=128, num_stages=2), dict(splits_per_sm=2),
               dict(splits_per_sm=8))


def fold_stage(case, ref, measure, kb: int, vb: int) -> None:
    """Stage C (``--stage fold``), from the rule-based launch defaults (not the table): how scales
    reach the dots (dequantized in registers, folded into q / p with or without a max-normalisation),
    then register caps, fewer stages and the split count for the best of them. The max-normalised
    folds of both (the old default) are the first row."""
    from kvtuner import kernels

    base = {k: x for k, x in kernels.launch_defaults(kb, vb, 128, 128, kernels.Target.of(case[0].device), table=False).items()
            if x is not None}
    base["block_n"] = 128
    rows = []
    for fk, fv in (("norm", "norm"), *FOLD_GRID):
        r = measure(case, ref, {**base, "fold_k": fk, "fold_v": fv}, "64x4096")
        if r and r["us"] and (fk, fv) != ("norm", "norm"):
            rows.append(r)
    if not rows:
        return
    best = min(rows, key=lambda r: r["us"])["variant"]
    for extra in FOLD_EXTRAS:
        measure(case, ref, {**best, **extra}, "64x4096")


def combine_stage(case, ref, measure, kb: int, vb: int) -> None:
    """Stage D (``--stage combine``), from the launch table's entry: stages x register cap x split
    target together (stage C varies one at a time), and both value orientations for 3-bit values."""
    from kvtuner import kernels

    base = dict(kernels.launch_defaults(kb, vb, 128, 128, kernels.Target.of(case[0].device)), block_n=128)
    swaps = (False, True) if vb == 3 else (base["swap_pv"],)
    for swap_pv, stages, maxnreg, per_sm in itertools.product(swaps, (2, 3), (None, 128, 168), (4, 8)):
        measure(case, ref, {**base, "swap_pv": swap_pv, "num_stages": stages, "maxnreg": maxnreg,
                            "splits_per_sm": per_sm}, "64x4096")


def warps_stage(case, ref, measure, kb: int, vb: int) -> None:
    """Stage E (``--stage warps``), from the launch table's entry: 8 warps per program with register
    caps (more warps per SM to hide latency, where 4 warps leave two programs of 4 per SM)."""
    from kvtuner import kernels

    base = dict(kernels.launch_defaults(kb, vb, 128, 128, kernels.Target.of(case[0].device)), block_n=128)
    measure(case, ref, base, "64x4096")  # the table's choice, re-measured in this run
    for maxnreg, stages in itertools.product((None, 128, 96), (2, 3)):
        measure(case, ref, {**base, "num_warps": 8, "maxnreg": maxnreg, "num_stages": stages}, "64x4096")


def write_table(path: str, rows: list[dict], command: str) -> None:
    """The fastest fold-stage variant per pair (B=64, L=4096) as the kernel's launch table."""
    import torch
    import triton

    table = json.load(open(path)) if os.path.exists(path) else {"pairs": {}}
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("us") and r["shape"] == "64x4096" and "fold_k" in r["variant"]:
            if r["pair"] not in best or r["us"] < best[r["pair"]]["us"]:
                best[r["pair"]] = r
    for pair, r in best.items():
        old = table["pairs"].get(f"{pair[0]},{pair[1]}")
        entry = {k: x for k, x in r["variant"].items() if k != "block_n"}
        entry.setdefault("maxnreg", None)
        # measured at another shape (ab_decode_variants.py): keep
        for small in ("splits_per_sm_small", "maxnreg_small", "num_stages_small"):
            if old and old.get(small):
                entry[small] = old[small]
        table["pairs"][f"{pair[0]},{pair[1]}"] = entry
    table.update(gpu=torch.cuda.get_device_name(0), triton=triton.__version__, command=command)
    table["pairs"] = dict(sorted(table["pairs"].items()))
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


def driver(args) -> None:
    t0 = time.time()
    rows, crashes = [], []
    for pair in args.pairs.split(","):
        skip: set[str] = set()
        for _attempt in range(6):
            proc = subprocess.run([sys.executable, __file__, "--child", pair, "--skip", json.dumps(sorted(skip)),
                                   "--stage", args.stage],
                                  capture_output=True, text=True, timeout=args.pair_timeout)
            last_try = None
            for line in proc.stdout.splitlines():
                if line.startswith("ROW "):
                    rows.append(json.loads(line[4:]))
                    print(line[4:], flush=True)
                elif line.startswith("TRY "):
                    last_try = json.loads(line[4:])
            if proc.returncode == 0:
                break
            if last_try is None:
                print(proc.stderr[-3000:], flush=True)
                break
            crashes.append(dict(**last_try, stderr=proc.stderr.strip().splitlines()[-1][:200] if proc.stderr else ""))
            print("CRASH", crashes[-1], flush=True)
            skip.add(variant_key(last_try["variant"]))
            rows = [r for r in rows if not (r["pair"] == pair)]  # the restarted pair re-emits its rows
        write(args, rows, crashes, t0)  # after every pair: a command that runs out of time keeps what it has
        if args.table:
            write_table(args.table, rows, f"python benchmarks/sweep_decode_kernel.py --pairs {args.pairs} --stage "
                                          f"{args.stage} --table {args.table}")


def write(args, rows, crashes, t0) -> None:
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    lines = ["# Decode kernel launch sweep (Hq=32, Hkv=8, D=128, bf16, KIVI G=128, 32-token bf16 residual)", "",
             f"GPU: {props.name}, torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
             f"python {platform.python_version()}. Command: `python benchmarks/sweep_decode_kernel.py --out {args.out} "
             f"--pairs {args.pairs} --stage {args.stage}` ({time.time() - t0:.0f} s).", "",
             "swap_qk: S^T = K q^T (the key tile is the wide MMA operand); swap_pv: acc^T = V^T P^T; asm: packed "
             "PTX unpacking (prmt/lop3 + f16x2 math); fold: scales dequantized in registers (reg), folded into "
             "q / p after a max-normalisation (norm) or without it (plain); maxnreg: register cap per thread; "
             "splits/SM: target programs per SM of the split-K grid. µs = median of triton.testing.do_bench (L2 flushed). Variants "
             "with relative error >= 2e-3 against the fp32 reference are not timed.", "",
             "| pair | shape | swap_qk | swap_pv | asm | warps | stages | block_n | fold k/v | maxnreg | splits/SM "
             "| µs | rel. err | regs | spills |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["variant"]
        cells = [f"K{r['pair'][0]}V{r['pair'][1]}", r["shape"], *(int(v[k]) for k in ("swap_qk", "swap_pv", "asm")),
                 v["num_warps"], v["num_stages"], v["block_n"], f"{v.get('fold_k', 'norm')}/{v.get('fold_v', 'norm')}",
                 v.get("maxnreg") or "-", v.get("splits_per_sm", 4)]
        if "error" in r:
            cells += [r["error"], "", "", ""]
        else:
            cells += ["" if r["us"] is None else f"{r['us']:.1f}", f"{r['rel_err']:.1e}", r["regs"], r["spills"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if crashes:
        lines += ["", "Crashed (CUDA error; the pair was restarted without the variant):", ""]
        lines += [f"- K{c['pair'][0]}V{c['pair'][1]} {c['shape']} {c['variant']}: {c['stderr']}" for c in crashes]
    best = {}
    for r in rows:
        if r.get("us") and r["shape"] == "64x4096":
            if r["pair"] not in best or r["us"] < best[r["pair"]]["us"]:
                best[r["pair"]] = r
    lines += ["", "Best per pair at B=64, L=4096:", ""]
    lines += [f"- K{p[0]}V{p[1]}: {r['us']:.1f} µs with {r['variant']}" for p, r in best.items()]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump(dict(rows=rows, crashes=crashes), f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/decode_kernel_sweep.md")
    ap.add_argument("--pairs", default=PAIRS)
    ap.add_argument("--pair-timeout", type=float, default=240)
    ap.add_argument("--child", default=None)
    ap.add_argument("--skip", default="[]")
    ap.add_argument("--table", default=None, help="with --stage fold/combine/warps: write the best variant per pair into this "
                    "launch table (the kernel reads src/kvtuner/kernels/tables/<gpu>.json, e.g. h100.json)")
    ap.add_argument("--stage", default="launch", choices=("launch", "fold", "combine", "warps"),
                    help="launch: orientation/unpack/warps/stages/tile; fold: scale folding, then register cap, stages, "
                    "splits one at a time; combine: stages x register cap x splits from the launch table; warps: 8 warps "
                    "with register caps")
    args = ap.parse_args()
    if args.child:
        child(args.child, set(json.loads(args.skip)), args.stage)
    else:
        driver(args)


if __name__ == "__main__":
    main()
