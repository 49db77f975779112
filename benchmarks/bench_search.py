"""Profile + search on SmolLM2 (KIVI mode), then evaluate the searched plans on held-out text.

    python benchmarks/bench_search.py --out-dir benchmarks/results/cpu

1. `kvtuner.profile` on calibration text (4 x 512 tokens, KIVI, 9 pairs), plus the one-layer
   end-to-end KL of every (layer, pair) on one 256-token window: the solver's per-layer costs
   (the defaults of `kvtuner tune`; `--sequences`, `--kl-seq-len` change them).
2. `kvtuner.search`: pruning, exact solver over the KL costs (no clustering: 30 groups), then
   NSGA-II (warm-started from the solver's points and the uniform plans within budget) measuring KL against full precision through the real cache on 2 calibration windows
   (384-token prefill + 256 tokens in 16-token steps), for budgets 3.25 and 4.0 equivalent bits.
3. The chosen plans are evaluated with `kvtuner.Evaluator` on held-out text (same protocol as
   `bench_quality.py`, without passkey) next to the uniform baselines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

import kvtuner
from kvtuner import KVPlan, load_model, profile
from kvtuner.data import default_texts
from kvtuner.evaluation import Evaluator
from kvtuner.profiling import SensitivityTable, calibration_batches, layer_kl
from kvtuner.search import search
from kvtuner.search.objectives import KLObjective

BUDGETS = (3.25, 4.0)
STORAGE = "/tmp/kvtuner-bench-search.db"
BASELINES = [(8, 4), (4, 4), (4, 2), (2, 4), (2, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="benchmarks/results/cpu")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--storage", default=STORAGE, help="Optuna storage; a study there with the same name is resumed")
    ap.add_argument("--sequences", type=int, default=4, help="profiling windows (kvtuner tune's default)")
    ap.add_argument("--kl-seq-len", type=int, default=256, help="tokens of the one-layer KL runs (tune's default)")
    ap.add_argument("--bits", default="8,4,2", help="candidate widths for K and V, e.g. 8,4,3,2 (every pair)")
    ap.add_argument("--rotation", action="store_true", help="Hadamard-rotated quantization (profiled and searched)")
    ap.add_argument("--sink", type=int, default=0, help="full-precision attention-sink tokens (QuantSpec.sink_length)")
    ap.add_argument("--baselines", default=",".join(f"{k}{v}" for k, v in BASELINES),
                    help="uniform plans evaluated next to the searched ones (k then v bits); with --rotation each "
                         "also rotated")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="equivalent-bit budgets, e.g. 3.25")
    ap.add_argument("--refine", type=int, default=0, help="measured budget-keeping local-search trials per budget "
                    "after NSGA-II (search(refine=...))")
    ap.add_argument("--refine-width", type=int, default=4, help="moves measured per local-search round")
    ap.add_argument("--objective-windows", type=int, default=2, help="calibration windows (384 prefill + 256 "
                    "scored tokens each) of the measured KL")
    ap.add_argument("--table", default="", help="a saved sensitivity table to search instead of profiling "
                    "(bench_search writes smollm2<tag>.kvtable.json)")
    ap.add_argument("--tag", default="", help="suffix of the result files (search_smollm2<tag>.md, ...)")
    args = ap.parse_args()
    out = Path(args.out_dir)
    budgets = [float(b) for b in args.budgets.split(",")]
    model, tok = load_model("smollm2")
    calib = default_texts("calibration")
    t0 = time.perf_counter()
    bits = [int(b) for b in args.bits.split(",")]
    pairs = [(k, v) for k in bits for v in bits]
    if args.table:
        table = SensitivityTable.load(args.table, config=model.config)
        if table.rotation != args.rotation or table.sink_length != args.sink:
            raise SystemExit(f"{args.table} was profiled with rotation={table.rotation}, sink={table.sink_length}; "
                             "pass the same --rotation/--sink")
    else:
        table = profile(model, tok, calib, pairs=pairs, modes=["kivi"], num_sequences=args.sequences, seq_len=512,
                        model_id="smollm2", rotation=args.rotation, sink_length=args.sink)
        table.kl = layer_kl(model, calibration_batches(tok, calib, 1, args.kl_seq_len), pairs, ["kivi"],
                            rotation=args.rotation, sink_length=args.sink)
        table.save(out / f"smollm2{args.tag}.kvtable.json")
    t_profile = time.perf_counter() - t0
    # windows past the profiling tokens (the first two as before --objective-windows existed)
    windows = calibration_batches(tok, calib, 8 + args.objective_windows, 640)[8:]
    objective = KLObjective(model, windows, prefill=384, chunk=16)
    # one-layer KL costs: DBSCAN's eps is in the cost's units, so cluster=False (30 groups; the solver is exact)
    fronts, proxy = {}, search(table, mode="kivi", progress=False, cluster=False)
    t1 = time.perf_counter()
    for budget in budgets:
        fronts[budget] = search(table, mode="kivi", max_bits=budget, quality=objective, n_trials=args.trials,
                                storage=args.storage, study_name=f"smollm2-kivi-{budget}{args.tag}", progress=True,
                                cluster=False, refine=args.refine, refine_width=args.refine_width)
        fronts[budget].save(out / f"smollm2{args.tag}.front-{budget}.json")
    t_search = time.perf_counter() - t1
    ev = Evaluator(model, tok, passkey_lengths=())
    rows = []
    plans = [(f"searched <= {b}", fronts[b].best(b)) for b in budgets]
    for k, v in ((int(x[0]), int(x[1])) for x in args.baselines.split(",")):
        for rot in (False, True) if args.rotation else (False,):
            plan = KVPlan.uniform(30, k, v, "kivi", rotation=rot, sink_length=args.sink)
            plans.append((f"uniform {plan.layers[0].name}" + (f" sink {args.sink}" if args.sink else ""), plan))
    for name, plan in plans:
        r = ev(plan)
        rows.append(dict(name=name, **r.to_dict()))
        print(rows[-1], flush=True)
        if name.startswith("searched"):
            plan.save(out / f"smollm2{args.tag}.plan-{name.split()[-1]}.json")
    lines = ["| plan | mode | eq. bits | bytes/token | PPL | vs full | KL | top-1 | gen. identical | gen. prefix |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | kivi | {r['equivalent_bits']:.2f} | {r['bytes_per_token']:.0f} | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / r['full_ppl'] - 1):+.2f} % | {r['kl']:.4f} | {r['top1']:.3f} | "
              f"{r['generation_agreement']:.2f} | {r['generation_prefix']:.1f} |" for r in rows]
    solver_at = {b: min((p for p in proxy.points if p.equivalent_bits <= b), key=lambda p: p.proxy_error) for b in budgets}
    info = {b: {k: v for k, v in fronts[b].info.items() if k != "candidates"} for b in budgets}
    refined = {b: f"; {info[b].get('trials_refine', 0)} local-search trials, measured KL best / start "
                  f"{info[b].get('refine_gain', 1.0):.3f}" if args.refine else "" for b in budgets}
    summary = [
        "# Search on SmolLM2 (KIVI)", "",
        f"Command: `python benchmarks/bench_search.py --out-dir {args.out_dir} --trials {args.trials} "
        f"--sequences {args.sequences} --kl-seq-len {args.kl_seq_len} --bits {args.bits}"
        f"{' --rotation' if args.rotation else ''}{f' --sink {args.sink}' if args.sink else ''} --baselines {args.baselines}"
        f"{f' --refine {args.refine} --refine-width {args.refine_width}' if args.refine else ''}"
        f"{f' --objective-windows {args.objective_windows}' if args.objective_windows != 2 else ''}"
        f"{' --table ' + args.table if args.table else ''}"
        f"{' --tag=' + args.tag if args.tag else ''}"
        f"{' --budgets ' + args.budgets if budgets != list(BUDGETS) else ''}"
        f"{' --storage ' + args.storage if args.storage != STORAGE else ''}`. "
        f"kvtuner {kvtuner.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} CPU threads.", "",
        f"* Profiling (KIVI, {len(pairs)} pairs{', rotated' if args.rotation else ''}"
        f"{f', {args.sink} sink tokens in full precision' if args.sink else ''}, 30 layers, "
        f"{args.sequences} x 512 tokens, + one-layer KL {30 * len(pairs)} runs x "
        f"{args.kl_seq_len} tokens): {t_profile:.0f} s. Search ({len(budgets)} budgets x "
        f"{args.trials} NSGA-II trials{f' + {args.refine} local-search trials' if args.refine else ''}, KL on "
        f"{args.objective_windows} x 256 calibration tokens): {t_search:.0f} s. "
        f"Profile + search: {t_profile + t_search:.0f} s.",
        f"* Layer groups (no clustering with KL costs): {len(proxy.info['groups'])} "
        f"(search space {proxy.info['search_space_size']} plans instead of {len(pairs)}^30).",
        *[f"* Budget {b}: {info[b]['trials_complete']} completed trials ({info[b]['trials_cached']} repeats served "
          f"from the study, {info[b]['trials_over_budget']} over budget and not measured"
          f"{refined[b]}); measured front {[(round(p.equivalent_bits, 2), round(p.quality, 4)) for p in fronts[b].points]}; "
          f"solver's proxy optimum at {solver_at[b].equivalent_bits:.2f} bits, chosen plan "
          f"{fronts[b].best(b).pairs}." for b in budgets],
        "", "Held-out evaluation (Evaluator: 2 windows of 384-token prefill + 256 teacher-forced decode steps; "
        "4 greedy continuations of 64 tokens):", "", *lines]
    (out / f"search_smollm2{args.tag}.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
