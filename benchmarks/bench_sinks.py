"""Does every layer need its sink token? Attention on token 0 per layer, and a plan without sinks where there is none.

    python benchmarks/bench_sinks.py --plan benchmarks/results/cpu/smollm2-plan-3.25.json \
        --out benchmarks/results/cpu/sinks_smollm2.md

1. Per layer, the mean attention probability on token 0 over heads and the queries after the first 64,
   on two 512-token calibration windows (the tune's profiling text).
2. The plan, and the plan with ``sink_length=0`` in every layer whose share is under ``--min-share``,
   against uniform KV4 on the tune's held-out protocol (16 windows of 256 prefill + 64 decode tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from provenance import provenance, publish

from kvtuner import Evaluator, KVPlan, LayerSpec
from kvtuner.data import default_texts
from kvtuner.models import load_model
from kvtuner.pipeline import TuneSettings, read_texts
from kvtuner.profiling import calibration_batches, capture_attention
from kvtuner.report import kl_ratio


@torch.no_grad()
def first_token_share(model, windows: list[torch.Tensor], skip: int = 64) -> list[float]:
    shares = []
    for ids in windows:
        with capture_attention(model) as rec:
            model(ids, use_cache=False)
        row = []
        for layer in sorted(rec):
            q, k = rec[layer]["q"].float(), rec[layer]["k"].float()
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            scores = (q @ k.transpose(-1, -2)) * rec[layer]["scaling"]
            n = scores.shape[-1]
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
            row.append(scores.softmax(-1)[..., skip:, 0].mean().item())
        shares.append(row)
    return torch.tensor(shares).mean(0).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True)
    ap.add_argument("--min-share", type=float, default=0.05)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    t0 = time.time()
    model, tok = load_model("smollm2")
    shares = first_token_share(model, calibration_batches(tok, default_texts("calibration"), 2, 512))
    plan = KVPlan.load(args.plan, config=model.config)
    bare = [i for i, s in enumerate(shares) if s < args.min_share]
    variant = KVPlan(tuple(LayerSpec(dataclasses.replace(lay.k, sink_length=0), dataclasses.replace(lay.v, sink_length=0))
                           if i in bare else lay for i, lay in enumerate(plan.layers)), model=plan.model,
                     key_rounding=plan.key_rounding)
    s = TuneSettings()
    ev = Evaluator(model, tok, read_texts("pydoc")[1], windows=s.eval_windows, prefill=s.eval_prefill,
                   decode=s.eval_decode, prompts=2, new_tokens=32, passkey_lengths=(), progress=False)
    rows = {}
    for name, p in (("uniform KV4", KVPlan.uniform(plan.num_layers, 4, 4, "kivi")), ("plan", plan),
                    ("plan without sinks in those layers", variant)):
        rows[name] = ev(p).to_dict()
    ref = rows["uniform KV4"]
    lines = ["# Sink tokens per layer (SmolLM2)", "",
             f"Command: `python benchmarks/bench_sinks.py --plan {args.plan} --min-share {args.min_share}`. "
             f"{provenance()}. {time.time() - t0:.0f} s.", "",
             "Attention on token 0 per layer (mean over heads and queries 64-511 of two 512-token calibration "
             "windows; a uniform share there is about 0.005):", "",
             " ".join(f"{i}: {x:.3f}" for i, x in enumerate(shares)), "",
             f"Layers under {args.min_share}: {bare}. Held-out KL (16 windows, paired with uniform KV4):", "",
             "| plan | KL | KL / uniform KV4 |", "|---|---|---|"]
    for name, r in rows.items():
        ratio = kl_ratio(r, ref) if r is not ref else None
        lines.append(f"| {name} | {r['kl']:.4f} | " + (f"{ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}]" if ratio
                                                        else "1") + " |")
    v = kl_ratio(rows["plan without sinks in those layers"], rows["plan"])
    lines += ["", f"Without those sinks / with: {v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]."]
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
