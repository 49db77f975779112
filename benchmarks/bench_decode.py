"""End-to-end batched decode on GPU at Llama-3.1-8B shape (random bf16 weights): kvtuner plans vs bf16.

    python benchmarks/bench_decode.py --out benchmarks/results/h100/decode.md

The model is built from a Llama-3.1-8B config with random weights (speed does not depend on the
values). For each (batch, context) the cache is filled directly with random keys/values through
the public ``Cache.update`` (a prefill of B x L tokens would only add time, not change the decode
step), then ``steps`` one-token decode steps run through ``model(...)`` with the public path.
With ``--mode graph`` (default) the step is also captured in a CUDA graph and replayed
(``kvtuner.generation.StaticDecoder``); the profiled rows (eager) show how much of the step the GPU
is busy and how much is attention.

Configurations: bf16 DynamicCache, KIVI KV8, KV4, K4V2 and KVTuner's published 3.25-bit
Llama-3.1-8B KIVI plan (KVTuner-C3.25: K8V4 {13,17}; KV4 {1-3,7,29,31}; K4V2 {5,6,8-12,14-16,
18-24,26,28,30}; KV2 {0,4,25,27}); no search was run on a real Llama here. ``--plan-file NAME=PATH``
adds a plan file's per-layer specs (bits, rotation, sink; e.g. a plan ``kvtuner tune`` searched for
SmolLM2) transplanted onto this shape, which needs ``--layers`` equal to its layer count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch
import transformers
import triton
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import strong_bf16
from kvtuner import KernelPolicy, KVPlan, MixedPrecisionCache, with_cache
from kvtuner.generation import StaticDecoder

C325 = {13: (8, 4), 17: (8, 4), **{i: (4, 4) for i in (1, 2, 3, 7, 29, 31)}, **{i: (2, 2) for i in (0, 4, 25, 27)}}


def plans(n: int) -> dict[str, KVPlan | None]:
    c325 = KVPlan.from_pairs([C325.get(i, (4, 2)) for i in range(n)], "kivi")
    return {"bf16": None, "KV8": KVPlan.uniform(n, 8, 8, "kivi"), "KV4": KVPlan.uniform(n, 4, 4, "kivi"),
            "K4V2": KVPlan.uniform(n, 4, 2, "kivi"), f"C{c325.equivalent_bits:.2f}": c325}


def plan_files(items: list[str], layers: int) -> dict[str, KVPlan]:
    """``NAME=PATH`` plan files, their layer specs without the model fingerprint of the model they were
    searched for (speed depends on the bits, rotation and sink of each layer, not on that model)."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            raise SystemExit(f"--plan-file {item!r} is invalid; allowed: NAME=PATH")
        plan = KVPlan.load(path)
        if plan.num_layers != layers:
            raise SystemExit(f"--plan-file {path}: {plan.num_layers} layers; allowed: --layers {plan.num_layers}")
        out[name] = KVPlan(plan.layers, model_id=plan.model_id, provenance=plan.provenance)
    return out


def build(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, torch_dtype="bfloat16")
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def fill(model, plan: KVPlan | None, batch: int, ctx: int, reserve: int, static: bool = False,
         policy: KernelPolicy = KernelPolicy()):
    """A cache holding ``ctx`` random tokens; bf16: DynamicCache, or StaticCache when ``static``."""
    cfg = model.config
    if plan is not None:
        cache = MixedPrecisionCache(plan, cfg, max_cache_len=ctx + reserve, policy=policy)
    elif static:
        cache = StaticCache(config=cfg, max_cache_len=ctx + reserve)
    else:
        cache = DynamicCache(config=cfg)
    g = torch.Generator(device="cuda").manual_seed(0)
    # quantized plans take the context in chunks: one 4096-token write per layer ran out of memory at
    # the largest batches (its fp32 rotation, before quant.rotate worked in row chunks); the results
    # files were measured with this fill
    chunk = ctx if plan is None else min(ctx, 1024)
    for layer in range(cfg.num_hidden_layers):
        for start in range(0, ctx, chunk):
            n = min(chunk, ctx - start)
            k = torch.randn(batch, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(batch, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            cache.update(k, v, layer, {"cache_position": torch.arange(start, start + n, device="cuda")})
            del k, v
    return cache


@torch.no_grad()
def decode_graph(model, cache, batch: int, steps: int) -> float:
    """Seconds per decode step with the step captured in a CUDA graph (kvtuner.generation.StaticDecoder)."""
    ctx = cache.get_seq_length()
    tok = torch.randint(0, 1000, (batch, 1), device="cuda")
    pos = torch.full((batch, 1), ctx, device="cuda")
    decoder = StaticDecoder(model, cache, tok, pos, ctx, ctx + steps + 4)
    decoder.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def sdpa_context(backend: str | None):
    """The SDPA backend the bf16 baseline runs with (None: PyTorch's own choice)."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, backend))


def greedy_steps(model, cache, tok: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` one-token greedy decode steps through ``model(...)``; returns the last token."""
    for _ in range(steps):
        tok = model(tok, **with_cache(model, cache)).logits[:, -1:].argmax(-1)
    return tok


@torch.no_grad()
def decode(model, cache, batch: int, steps: int, backend: str | None = None) -> float:
    tok = torch.randint(0, 1000, (batch, 1), device="cuda")
    with sdpa_context(backend):
        tok = greedy_steps(model, cache, tok, 2)  # warm-up (compiles kernels)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        greedy_steps(model, cache, tok, steps)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


ATTENTION_KERNELS = ("_decode_split_kernel", "_merge_kernel", "flash", "fmha", "cudnn", "attention", "sdpa")


@torch.no_grad()
def where_time_goes(model, cache, batch: int, steps: int, backend: str | None) -> dict[str, float]:
    """Per decode step: wall time, GPU busy time (sum of kernel durations) and the attention kernels' share."""
    from torch.profiler import ProfilerActivity, profile

    tok = torch.randint(0, 1000, (batch, 1), device="cuda")
    with sdpa_context(backend):
        tok = greedy_steps(model, cache, tok, 1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            greedy_steps(model, cache, tok, steps)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / steps
    busy = attn = 0.0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        busy += us
        if any(k.lower() in e.name.lower() for k in ATTENTION_KERNELS):
            attn += us
    return dict(wall_ms=wall * 1e3, gpu_busy_ms=busy / steps / 1e3, attention_ms=attn / steps / 1e3)


@torch.no_grad()
def greedy_agreement(model, plan: KVPlan | None, prompts: int, prompt_len: int, new_tokens: int,
                     backend: str | None = None) -> dict[str, float]:
    """:func:`agreement` on random-token prompts (random weights: no text to draw prompts from)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (prompts, prompt_len), device="cuda", generator=g)
    return agreement(model, plan, ids, new_tokens, backend)


@torch.no_grad()
def agreement(model, plan: KVPlan | None, ids: torch.Tensor, new_tokens: int, backend: str | None = None,
              pad_token_id: int = 0) -> dict[str, float]:
    """Greedy continuations of the prompts ``ids`` ``[P, T]`` with ``plan`` (the cache's automatic
    path: the fused kernel on CUDA) vs the model's own 16-bit DynamicCache, via ``generate``.

    ``plan=None`` measures the floor instead: DynamicCache again, under another SDPA ``backend``
    (rounding alone flips argmaxes whose top-2 margin is tiny, as with random weights).
    """
    prompts, prompt_len = ids.shape
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
              output_logits=True, pad_token_id=pad_token_id, attention_mask=torch.ones_like(ids))
    ref = model.generate(ids, **with_cache(model, DynamicCache(config=model.config)), **kw)
    with sdpa_context(backend):
        cache = DynamicCache(config=model.config) if plan is None else MixedPrecisionCache(plan, model.config)
        got = model.generate(ids, **with_cache(model, cache), **kw)
    a, b = ref.sequences[:, prompt_len:], got.sequences[:, prompt_len:]
    same = (a == b).int()
    prefix = same.cumprod(dim=1).sum(dim=1)  # tokens until the first difference
    # logits closeness while both runs still read the same tokens
    rel, kl, n = 0.0, 0.0, 0
    for step, (la, lb) in enumerate(zip(ref.logits, got.logits)):
        live = prefix > step
        if not live.any():
            break
        la, lb = la[live].float(), lb[live].float()
        rel = max(rel, float(((la - lb).norm(dim=-1) / la.norm(dim=-1)).max()))
        kl += float((torch.log_softmax(la, -1).exp() * (torch.log_softmax(la, -1) - torch.log_softmax(lb, -1)))
                    .sum(-1).sum())
        n += int(live.sum())
    top2 = torch.stack(ref.logits).float().topk(2, dim=-1).values  # margin of the 16-bit argmax
    return dict(prompts=prompts, prompt_len=prompt_len, new_tokens=new_tokens,
                all_match=int((prefix == new_tokens).sum()), mean_prefix=float(prefix.float().mean()),
                token_agreement=float(same.float().mean()), max_rel_logit_diff=rel, mean_kl=kl / max(n, 1),
                median_top2_margin=float((top2[..., 0] - top2[..., 1]).median()))


@torch.no_grad()
def policy_of(args) -> KernelPolicy:
    return KernelPolicy(words3="off" if args.planes3 else "auto", decode=args.decode)


def python_profile(args) -> None:
    """Where the host time of a decode step goes: cProfile over ``--steps`` steps, top functions."""
    import cProfile
    import pstats

    name, batch, ctx = args.cprofile.split(":")
    batch, ctx = int(batch), int(ctx)
    model = build(args.layers)
    plan = plans(args.layers)[name]
    cache = fill(model, plan, batch, ctx, args.steps + 8, policy=policy_of(args))
    tok = greedy_steps(model, cache, torch.randint(0, 1000, (batch, 1), device="cuda"), 2)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    greedy_steps(model, cache, tok, args.steps)
    torch.cuda.synchronize()
    prof.disable()
    print(f"{name} B={batch} L={ctx}: {1e3 * (time.perf_counter() - t0) / args.steps:.1f} ms/step under cProfile")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/decode_gpu.md")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget-gib", type=float, default=30.0, help="GPU memory for the KV cache")
    ap.add_argument("--peak-tbs", type=float, default=None, help="HBM peak for the share column (default: the "
                    "GPU's, provenance.HBM_PEAK): (weights + KV bytes) / step time / peak, every byte read once")
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--max-kv-gib", type=float, default=56.0, help="skip grid points whose cache needs more")
    ap.add_argument("--bf16-backends", default="FLASH_ATTENTION,EFFICIENT_ATTENTION",
                    help="SDPA backends tried for the bf16 baseline (the fastest at B=64, L=4096 is used)")
    ap.add_argument("--mode", choices=("graph", "eager"), default="graph",
                    help="graph: decode steps replayed from a CUDA graph (kvtuner.generation.StaticDecoder; bf16 "
                         "on a StaticCache), the faster of graph and eager counts where both run; eager: model(...)"
                         " steps only")
    ap.add_argument("--plan-file", action="append", default=[], metavar="NAME=PATH",
                    help="also run this plan file under NAME (repeatable; its layer count must equal --layers)")
    ap.add_argument("--planes3", action="store_true", help="3-bit codes in two bit planes (KernelPolicy(words3="
                    "'off')); default: contiguous words")
    ap.add_argument("--decode", choices=("auto", "triton", "gluon"), default="triton",
                    help="decode-attention kernel of the layers the Gluon kernel reads (KernelPolicy(decode=...))")
    ap.add_argument("--plot", help="only draw the plot from this JSON result file (no GPU needed)")
    ap.add_argument("--cprofile", metavar="CONFIG:BATCH:CONTEXT",
                    help="only profile the Python side of decode steps (cProfile), e.g. C3.25:64:4096")
    args = ap.parse_args()
    policy = policy_of(args)
    if args.plot:
        plot(json.loads(open(args.plot).read()), args.plot.replace(".json", ".png"))
        return
    if args.cprofile:
        python_profile(args)
        return
    if args.peak_tbs is None:
        from provenance import hbm_peak

        args.peak_tbs = hbm_peak() / 1e12
    t_start = time.time()
    model = build(args.layers)
    weights = torch.cuda.memory_allocated()
    cfg = model.config
    named = plans(args.layers)
    extra = plan_files(args.plan_file, args.layers)
    if set(extra) & set(named):
        raise SystemExit(f"--plan-file names {sorted(set(extra) & set(named))} are taken; allowed: other names")
    named.update(extra)
    reserve = 2 * args.steps + 16  # eager steps, then graph steps on the same cache
    result = dict(gpu=torch.cuda.get_device_properties(0).name, torch=torch.__version__, triton=triton.__version__,
                  transformers=transformers.__version__, layers=args.layers, steps=args.steps,
                  budget_gib=args.budget_gib, mode=args.mode, argv=sys.argv[1:], rows=[], sdpa=[], profile=[],
                  agreement={})
    rows = result["rows"]

    def kv_bytes(plan, batch, ctx):
        return (plan or KVPlan.uniform(args.layers, 16, 16)).expected_nbytes(cfg, ctx + reserve, batch, dtype_bytes=2)

    def run(name, plan, batch, ctx, tag="", backend=None, record=rows, profile_steps=0, eager=None, graph=None):
        """Graph-mode step (``--mode graph``) and/or the eager step; tokens/s from the faster mode
        that was run (the eager one alone with ``--mode eager``)."""
        # bf16 runs both: eager on a DynamicCache, and the strong baseline (strong_bf16.py) in a graph
        eager = (args.mode == "eager" or bool(profile_steps) or plan is None) if eager is None else eager
        graph = args.mode == "graph" if graph is None else graph
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cache = None
        dt_e = dt_g = prof = None
        try:
            if eager:
                cache = fill(model, plan, batch, ctx, reserve, policy=policy)
                kv = torch.cuda.memory_allocated() - weights
                dt_e = decode(model, cache, batch, args.steps, backend)
                prof = where_time_goes(model, cache, batch, profile_steps, backend) if profile_steps else None
                if plan is None and graph:  # the bf16 graph step brings its own static buffers
                    cache = None
                    torch.cuda.empty_cache()
            if graph and plan is None:
                dt_g = strong_bf16.step_seconds(model, batch, ctx, args.steps)
                kv = strong_bf16.kv_bytes(model, batch, ctx)
            elif graph:
                if cache is None:
                    cache = fill(model, plan, batch, ctx, reserve, static=True, policy=policy)
                    kv = torch.cuda.memory_allocated() - weights
                dt_g = decode_graph(model, cache, batch, args.steps)
        except torch.OutOfMemoryError:
            record.append(dict(config=name, batch=batch, context=ctx, note="out of memory", tag=tag))
            return None
        finally:
            cache = None
            torch.cuda.empty_cache()
        dt = min(x for x in (dt_e, dt_g) if x is not None)
        row = dict(config=name, batch=batch, context=ctx, ms_per_step=1e3 * dt, tokens_per_s=batch / dt,
                   hbm_share=(weights + kv) / dt / (args.peak_tbs * 1e12),
                   kv_gib=kv / 2**30, peak_gib=torch.cuda.max_memory_allocated() / 2**30, tag=tag,
                   sdpa_backend=backend or "default", mode="graph" if dt == dt_g else "eager",
                   eager_ms=None if dt_e is None else 1e3 * dt_e, graph_ms=None if dt_g is None else 1e3 * dt_g)
        if prof:
            row.update(prof)
        record.append(row)
        print(row, flush=True)
        return batch / dt

    # 1. the bf16 baseline gets the fastest SDPA backend at the benchmark's central shape
    best, best_tps = None, 0.0
    # cuDNN SDPA, forced, hit an illegal memory access at B=1, L=4096 on the H100 (torch 2.11): not in the list
    for backend in args.bf16_backends.split(","):
        backend = None if backend == "default" else backend
        try:
            tps = run("bf16", None, 64, 4096, backend=backend, record=result["sdpa"], eager=True, graph=False)
        except RuntimeError as err:  # a backend that refuses this shape
            result["sdpa"].append(dict(config="bf16", sdpa_backend=backend, note=str(err).splitlines()[0][:120]))
            continue
        if tps and tps > best_tps:
            best, best_tps = backend, tps
    result["bf16_backend"] = best or "default"

    def backend_of(plan):
        return best if plan is None else None

    # 3. maximum throughput under a fixed KV budget at 4096 tokens (the paper's metric), with a profile
    ctx = 4096
    for name, plan in named.items():
        batch = max(1, int(args.budget_gib * 2**30 // kv_bytes(plan, 1, ctx)))
        run(name, plan, batch, ctx, tag=f"max batch in {args.budget_gib:g} GiB", backend=backend_of(plan),
            profile_steps=3)
    # 3b. the same metric at longer contexts, bf16 vs the mixed plan
    mixed_name = [n for n in named if n.startswith("C")][0]
    for ctx in [int(x) for x in args.contexts.split(",") if int(x) > 4096]:
        for name in ("bf16", mixed_name):
            batch = max(1, int(args.budget_gib * 2**30 // kv_bytes(named[name], 1, ctx)))
            run(name, named[name], batch, ctx, tag=f"max batch in {args.budget_gib:g} GiB at {ctx}",
                backend=backend_of(named[name]))
    # 4. where the time goes at B=64, L=4096
    for name in ("bf16", "KV8", [n for n in named if n.startswith("C")][0]):
        run(name, named[name], 64, 4096, tag="profiled", backend=backend_of(named[name]), record=result["profile"],
            profile_steps=3)
    # 5. greedy agreement, KV8 through the fused kernel vs bf16
    result["agreement"] = greedy_agreement(model, named["KV8"], prompts=8, prompt_len=1024, new_tokens=32)
    result["agreement_floor"] = greedy_agreement(model, None, prompts=8, prompt_len=1024, new_tokens=32,
                                                 backend="MATH")
    print(result["agreement"], result["agreement_floor"], flush=True)
    save(result, args, t_start)
    # 6. the grid (last: the longest part; results are saved after every context)
    for ctx in [int(x) for x in args.contexts.split(",")]:
        for batch in [int(x) for x in args.batches.split(",")]:
            for name, plan in named.items():
                if kv_bytes(plan, batch, ctx) > args.max_kv_gib * 2**30:
                    rows.append(dict(config=name, batch=batch, context=ctx, note="skipped: cache > "
                                     f"{args.max_kv_gib:g} GiB", tag=""))
                    continue
                run(name, plan, batch, ctx, backend=backend_of(plan))
        save(result, args, t_start)
    print(report(result, args))


def save(result: dict, args, t_start: float) -> None:
    result["seconds"] = time.time() - t_start
    with open(args.out.replace(".md", ".json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out, "w") as f:
        f.write(report(result, args))


def report(r: dict, args) -> str:
    lines = [f"# End-to-end decode, Llama-3.1-8B shape ({r['layers']} layers), random bf16 weights", "",
             f"GPU: {r['gpu']}; torch {r['torch']}, triton {r['triton']}, transformers {r['transformers']}. "
             "Command: `PYTHONPATH=src python benchmarks/bench_decode.py "
             f"{' '.join(r.get('argv') or ['--out', args.out])}` (--steps {r['steps']}, "
             f"--budget-gib {r['budget_gib']:g}, --mode {r.get('mode', 'eager')}); {r['seconds']:.0f} s in all. KV "
             "caches filled through Cache.update, then timed one-token greedy decode steps: eager = model(...) per "
             "step (bf16 on a DynamicCache with the fastest SDPA backend measured at B=64, L=4096: "
             f"**{r['bf16_backend']}**); graph = the step captured once in a CUDA graph and replayed "
             "(quantized plans: kvtuner.generation.StaticDecoder on MixedPrecisionCache.make_static buffers, flushes "
             "between replays; bf16: the strong baseline of benchmarks/strong_bf16.py, static per-layer bf16 buffers, "
             "flash SDPA with enable_gqa and no mask). "
             "ms/step = the faster of the two where both ran.", "", "## SDPA backends for the bf16 baseline (B=64, L=4096)", "",
             "| backend | ms/step | tokens/s | note |", "|---|---|---|---|"]
    for x in r["sdpa"]:
        lines.append(f"| {x.get('sdpa_backend') or 'default'} | {x.get('ms_per_step', float('nan')):.1f} | "
                     f"{x.get('tokens_per_s', float('nan')):.0f} | {x.get('note', '')} |")

    def table(rows, extra=False):
        head = ("| config | batch | context | ms/step | tokens/s | eager ms | graph ms | KV GiB | peak GiB | share of HBM "
                "peak | note |")
        sep = "|---|---|---|---|---|---|---|---|---|---|---|"
        if extra:
            head = head[:-7] + " GPU busy ms | tokens/s at GPU-busy time | attention ms | attention share | note |"
            sep += "---|---|---|---|"
        out = [head, sep]
        for x in rows:
            if "ms_per_step" not in x:
                out.append(f"| {x['config']} | {x['batch']} | {x['context']} | | | | | | | |" + (" | | | |" if extra else "")
                           + f" {x.get('note', '')} {x.get('tag', '')} |")
                continue
            ms = ["" if x.get(k) is None else f"{x[k]:.1f}" for k in ("eager_ms", "graph_ms")]
            if "mode" not in x:  # results from before graph mode: eager only
                ms = [f"{x['ms_per_step']:.1f}", ""]
            cells = (f"| {x['config']} | {x['batch']} | {x['context']} | {x['ms_per_step']:.1f} | "
                     f"{x['tokens_per_s']:.0f} | {ms[0]} | {ms[1]} | {x['kv_gib']:.1f} | {x['peak_gib']:.1f} | "
                     f"{100 * x.get('hbm_share', float('nan')):.0f} % |")
            if extra:
                cells += (f" {x['gpu_busy_ms']:.1f} | {1e3 * x['batch'] / x['gpu_busy_ms']:.0f} | {x['attention_ms']:.1f} | "
                          f"{100 * x['attention_ms'] / x['ms_per_step']:.0f} % of step |")
            out.append(cells + f" {x.get('tag', '')} |")
        return out

    maxrows = [x for x in r["rows"] if x.get("tag", "") == f"max batch in {r['budget_gib']:g} GiB"]
    longer = [x for x in r["rows"] if x.get("tag", "").startswith(f"max batch in {r['budget_gib']:g} GiB at")]
    tps = {x["config"]: x.get("tokens_per_s", 0.0) for x in maxrows}
    busy = {x["config"]: 1e3 * x["batch"] / x["gpu_busy_ms"] for x in maxrows if x.get("gpu_busy_ms")}
    mixed = next(c for c in tps if c.startswith("C"))
    lines += ["", f"## Maximum throughput in {r['budget_gib']:g} GiB of KV cache, 4096-token context", "",
              *table(maxrows, extra=True), "",
              f"{mixed}: {ratio(tps, mixed, 'KV8')} uniform KV8, {ratio(tps, mixed, 'bf16')} bf16 (measured wall "
              f"time; ms/step is the faster of the eager and graph steps, both in the table; bf16's graph step is the "
              f"strong baseline). On the eager steps' GPU-busy time: {ratio(busy, mixed, 'KV8')} KV8.", "",
              f"## Maximum throughput in {r['budget_gib']:g} GiB of KV cache at longer contexts", "",
              *table(longer), "",
              "## Where the time goes (B=64, L=4096; 3 profiled steps)", "", *table(r["profile"], extra=True),
              "", "## Grid", "", *table([x for x in r["rows"] if not x.get("tag")])]
    a, f = r["agreement"], r.get("agreement_floor")
    lines += [] if not a else ["", "## Greedy agreement: KV8 (fused kernel) vs bf16 DynamicCache, `model.generate`", "",
              f"{a['prompts']} random-token prompts of {a['prompt_len']} tokens, {a['new_tokens']} greedy tokens: "
              f"{a['all_match']}/{a['prompts']} prompts identical for all {a['new_tokens']} tokens; mean identical "
              f"prefix {a['mean_prefix']:.1f} tokens; token agreement {a['token_agreement']:.3f}; while the "
              f"sequences agree, max relative logit difference {a['max_rel_logit_diff']:.2e}, mean KL "
              f"{a['mean_kl']:.2e} nats; median top-1/top-2 logit margin of the bf16 run {a['median_top2_margin']:.3f}."]
    if f:
        lines += ["", f"Floor, bf16 DynamicCache under the MATH SDPA backend vs the default backend (same weights, "
                  f"same prompts): {f['all_match']}/{f['prompts']} prompts identical for all {f['new_tokens']} tokens;"
                  f" mean identical prefix {f['mean_prefix']:.1f}; token agreement {f['token_agreement']:.3f}; max "
                  f"relative logit difference {f['max_rel_logit_diff']:.2e}, mean KL {f['mean_kl']:.2e}."]
    return "\n".join(lines) + "\n"


def ratio(tps: dict, a: str, b: str) -> str:
    return f"{tps[a] / tps[b]:.2f}x" if tps.get(a) and tps.get(b) else "n/a (a run failed)"


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = sorted({x["context"] for x in r["rows"] if not x.get("tag")})
    fig, axes = plt.subplots(1, len(ctxs), figsize=(4.2 * len(ctxs), 3.8), sharey=True)
    for ax, ctx in zip(list(axes), ctxs):
        for cfg in dict.fromkeys(x["config"] for x in r["rows"]):
            pts = sorted((x["batch"], x["tokens_per_s"]) for x in r["rows"]
                         if x["config"] == cfg and x["context"] == ctx and "tokens_per_s" in x)
            if pts:
                line, = ax.plot(*zip(*pts), marker="o", label=cfg)
                if ctx == 4096:  # the budget point: largest batch that fits
                    best = [x for x in r["rows"] if x["config"] == cfg and x.get("tag", "").startswith("max")
                            and "tokens_per_s" in x]
                    for x in best:
                        ax.plot([x["batch"]], [x["tokens_per_s"]], marker="*", ms=14, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_title(f"context {ctx}" + (f" (stars: max batch in {r['budget_gib']:g} GiB)" if ctx == 4096 else ""),
                     fontsize=9)
        ax.set_xlabel("batch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("decode tokens/s")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Llama-3.1-8B shape, random weights, {r['gpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
