"""Held-out quality of plans over many text windows, with the window-to-window noise of the PPL ratio.

    python benchmarks/bench_heldout.py --windows 8 --plans KV4,K4V2,benchmarks/results/cpu/smollm2-plan-3.25.json \
        --out heldout_smollm2.md

A plan is a uniform name (``KV4``, ``K4V2``, ``K4V3r``: ``r`` = Hadamard-rotated, ``s1`` = one
full-precision sink token as in ``KV3rs1``; ``--mode`` sets the grouping) or a plan JSON file. Protocol: `kvtuner.Evaluator` (``--windows`` windows of held-out pydoc
text, each a 384-token prefill then 256 teacher-forced one-token decode steps; 2 greedy continuations
of 32 tokens; no passkey). Each window's mean NLL difference (plan minus full precision) is one sample:
the table gives PPL ratio - 1 with a +-2 standard-error interval over windows, so one noisy window
cannot decide a 0.5 % question.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from provenance import provenance, publish

from kvtuner import KVPlan, load_model
from kvtuner.evaluation import Evaluator

UNIFORM = re.compile(r"^K(\d+)?V(\d+)(r?)(?:s(\d+))?$")


def parse_plan(text: str, num_layers: int, mode: str) -> tuple[str, KVPlan]:
    """``(label, plan)`` from a uniform name or a plan file."""
    m = UNIFORM.match(text)
    if m:
        k, v = int(m.group(1) or m.group(2)), int(m.group(2))
        return text, KVPlan.uniform(num_layers, k, v, mode, rotation=bool(m.group(3)),
                                    sink_length=int(m.group(4) or 0))
    path = Path(text)
    if not path.is_file():
        raise SystemExit(f"plan {text!r} is invalid; allowed: a uniform name like KV4, K4V2, K4V3r, KV3rs1, or a "
                         "plan file")
    return path.name, KVPlan.load(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", required=True, help="comma-separated uniform names and/or plan files")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--mode", default="kivi", help="grouping of the uniform plans")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load_model("smollm2")
    n = model.config.num_hidden_layers
    plans = [parse_plan(p.strip(), n, args.mode) for p in args.plans.split(",")]
    ev = Evaluator(model, tok, windows=args.windows, passkey_lengths=(), prompts=2, new_tokens=32)
    t0 = time.perf_counter()
    rows, reports = [], []
    for label, plan in plans:
        r = ev(plan)
        reports.append(r)
        lo, hi = r.ppl_delta_interval()
        ratio = r.kl_ratio_interval(reports[0]) if len(reports) > 1 else None
        rows.append(dict(label=label, lo=lo, hi=hi, kl_ratio=ratio, **r.to_dict()))
        print(json.dumps({k: rows[-1][k] for k in ("label", "ppl", "full_ppl", "kl", "lo", "hi")}), flush=True)
    seconds = time.perf_counter() - t0
    lines = ["| plan | eq. bits | bytes/token | PPL | vs full | +-2 s.e. over windows | KL | KL / first plan, paired | "
             "top-1 | worst window |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        worst = max(r["window_nll_delta"])
        ratio = "" if r["kl_ratio"] is None else "{:.2f} [{:.2f}, {:.2f}]".format(*r["kl_ratio"])
        lines.append(f"| {r['label']} | {r['equivalent_bits']:.2f} | {r['bytes_per_token']:.0f} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / r['full_ppl'] - 1):+.2f} % | [{100 * r['lo']:+.2f}, {100 * r['hi']:+.2f}] % | "
                     f"{r['kl']:.4f} | {ratio} | {r['top1']:.3f} | {100 * torch.tensor(worst).expm1().item():+.2f} % |")
    text = "\n".join([
        "# Held-out quality over many windows (SmolLM2)", "",
        f"Command: `python benchmarks/bench_heldout.py --windows {args.windows} --mode {args.mode} --plans "
        f"{args.plans}`. SmolLM2-135M-Instruct (fp32 weights from the Q4_1 GGUF), held-out pydoc text, "
        f"{args.windows} windows x 256 scored decode steps; full precision PPL {rows[0]['full_ppl']:.3f}. "
        f"{len(rows)} plans in {seconds:.0f} s, {torch.get_num_threads()} CPU threads. {provenance()}.", "",
        "Interval: exp(mean +- 2 s.e.) - 1 of the per-window mean NLL differences (windows as samples). "
        "KL / first plan: geometric mean of the per-window KL ratios to the first plan's, with exp(+- 2 s.e.) "
        "of the log ratios (QualityReport.kl_ratio_interval). "
        "Worst window: the largest single-window PPL increase.", "", *lines])
    publish(text, args.out)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
