"""Time per generated token of every decoding path at Llama-3.1-8B shape (random bf16 weights), one run.

    PYTHONPATH=src python benchmarks/bench_generate.py --out benchmarks/results/h100/generate.md

Paths, each from a ``--prompt``-token prompt at batch 1 and 8:
  * bf16 ``model.generate`` (DynamicCache, eager), sampling;
  * the KV4 plan through ``model.generate`` (eager), greedy and sampling;
  * the KV4 plan through ``kvtuner.greedy_generate`` (CUDA graph);
  * the KV4 plan through ``kvtuner.generate`` (CUDA graph), sampling with top-p and a repetition penalty;
  * the strong bf16 step (``strong_bf16.step_seconds``: static buffers, flash SDPA, CUDA graph) at the
    prompt's context, a floor for bf16 decoding.

Time per token: each path runs ``--short`` and ``--long`` new tokens after one untimed warm-up call;
(t_long - t_short) / (long - short) removes the prefill and the per-call set-up. The per-call set-up
(capture, or nothing for eager paths) is the short call minus its prefill and its tokens.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, "benchmarks")

import strong_bf16  # noqa: E402
from bench_decode import build  # noqa: E402
from provenance import provenance, publish  # noqa: E402

from kvtuner import KVPlan, MixedPrecisionCache, generate, greedy_generate, with_cache  # noqa: E402

SAMPLE = dict(do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.1)


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def paths(model, plan: KVPlan):
    cfg = model.config

    def hf(cache_of, **kw):
        def run(ids, n):
            torch.manual_seed(0)
            with torch.no_grad():
                model.generate(ids, **with_cache(model, cache_of()), max_new_tokens=n, min_new_tokens=n,
                               pad_token_id=0, **kw)
        return run

    def ours_greedy(ids, n):
        greedy_generate(model, ids, MixedPrecisionCache(plan, cfg), n)

    def ours_sample(ids, n):
        torch.manual_seed(0)
        generate(model, ids, MixedPrecisionCache(plan, cfg), max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                 **SAMPLE)

    from transformers import DynamicCache

    return {"bf16 model.generate, sampling (DynamicCache, eager)": hf(lambda: DynamicCache(config=cfg), **SAMPLE),
            "KV4 model.generate, greedy (eager)": hf(lambda: MixedPrecisionCache(plan, cfg), do_sample=False),
            "KV4 model.generate, sampling (eager)": hf(lambda: MixedPrecisionCache(plan, cfg), **SAMPLE),
            "KV4 kvtuner.greedy_generate (CUDA graph)": ours_greedy,
            "KV4 kvtuner.generate, sampling top-p + repetition penalty (CUDA graph)": ours_sample}


def prefill_seconds(model, ids) -> float:
    with torch.no_grad():
        model(ids, logits_to_keep=1)
        return timed(lambda: model(ids, logits_to_keep=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--long", type=int, default=80)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    t_start = time.time()
    model = build(args.layers)
    plan = KVPlan.uniform(args.layers, 4, 4, "kivi")
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        ids = torch.randint(3, 120000, (b, args.prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(b))
        pre = prefill_seconds(model, ids)
        strong = strong_bf16.step_seconds(model, b, args.prompt + args.long // 2)
        rows.append((b, "strong bf16 step (static buffers, flash SDPA, CUDA graph)", 1e3 * strong, None, None))
        for name, run in paths(model, plan).items():
            first = timed(lambda: run(ids, args.short))  # includes one-time costs (Triton compiles, allocator)
            short = timed(lambda: run(ids, args.short))
            long = timed(lambda: run(ids, args.long))
            per_token = (long - short) / (args.long - args.short)
            setup = short - pre - args.short * per_token
            rows.append((b, name, 1e3 * per_token, setup, first - short))
            print(b, name, f"{1e3 * per_token:.2f} ms/token, set-up {setup:.2f} s, first call +{first - short:.1f} s",
                  flush=True)
            torch.cuda.empty_cache()
    lines = ["# Time per generated token, every decoding path (Llama-3.1-8B shape, random bf16 weights)", "",
             f"Command: `python benchmarks/bench_generate.py --prompt {args.prompt} --batches {args.batches} "
             f"--short {args.short} --long {args.long}`. {provenance()}. {time.time() - t_start:.0f} s.", "",
             f"{args.prompt}-token prompt. ms/token = (t({args.long} new) - t({args.short} new)) / "
             f"{args.long - args.short}, after one warm-up call. Per-call set-up: a call's time minus its prefill "
             "and its tokens (graph capture for the graph paths). First call: the extra time of the very first call "
             "of the process (kernel compilation, allocator growth). Ratios are to kvtuner.greedy_generate at the "
             "same batch.", "",
             "| batch | path | ms / token | vs greedy_generate | per-call set-up, s | first call, extra s |",
             "|---|---|---|---|---|---|"]
    for b in sorted({r[0] for r in rows}):
        greedy = next(r[2] for r in rows if r[0] == b and "greedy_generate" in r[1])
        for _, name, ms, setup, first in (r for r in rows if r[0] == b):
            lines.append(f"| {b} | {name} | {ms:.2f} | {ms / greedy:.2f}x | "
                         f"{'' if setup is None else f'{setup:.2f}'} | {'' if first is None else f'{first:.1f}'} |")
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
