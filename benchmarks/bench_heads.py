"""Per-head sensitivity spread on SmolLM2: would per-head bits pay off?

    python benchmarks/bench_heads.py --out benchmarks/results/cpu/heads_smollm2.md

`kvtuner.profiling.head_errors` on calibration text (``--sequences`` x 512 tokens, KIVI): the
relative attention-output error of each of the 3 KV heads of every layer (over the 3 query heads
that read it) for K2V2, K4V2, K4V4 and key-only/value-only 2-bit. Then a proxy of what per-head bits
could gain at 3 equivalent bits per layer: the best assignment of {K2V2, K4V2, K4V4} to the 3 heads
with the same total bits as all-K4V2 (e.g. one K4V4 head, one K4V2, one K2V2), against all-K4V2,
in summed attention error (a proxy, not the model's KL).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from provenance import publish

import kvtuner
from kvtuner import load_model
from kvtuner.data import default_texts
from kvtuner.profiling import calibration_batches, head_errors

PAIRS = [(2, 2), (4, 2), (4, 4), (2, 16), (16, 2)]


def budget_min(costs: list[list[float]], weight: int) -> float:
    """Least summed cost choosing K2V2/K4V2/K4V4 (2/3/4 bits, ``weight`` heads each) per item so that
    the mean is exactly 3 bits: a knapsack over the bit surplus (exact)."""
    best = {0: 0.0}  # surplus over 3 bits per head -> least cost
    for c in costs:
        nxt: dict[int, float] = {}
        for surplus, total in best.items():
            for j, d in enumerate((-1, 0, 1)):
                key = surplus + d * weight
                if total + c[j] < nxt.get(key, float("inf")):
                    nxt[key] = total + c[j]
        best = nxt
    return best[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--rotation", action="store_true")
    args = ap.parse_args()
    model, tok = load_model("smollm2")
    t0 = time.perf_counter()
    batches = calibration_batches(tok, default_texts("calibration"), args.sequences, 512)
    err = head_errors(model, batches, PAIRS, "kivi", rotation=args.rotation)  # [L, H, P]
    seconds = time.perf_counter() - t0
    L, H, _ = err.shape
    names = [f"K{k}V{v}" for k, v in PAIRS]
    ratio = err.max(1).values / err.min(1).values  # [L, P] spread across heads
    lines = ["| layer | " + " | ".join(f"{n} per head" for n in names) + " | max/min K4V2 |",
             "|---|" + "---|" * (len(PAIRS) + 1)]
    for li in range(L):
        cells = [" / ".join(f"{x:.3f}" for x in err[li, :, j].tolist()) for j in range(len(PAIRS))]
        lines.append(f"| {li} | " + " | ".join(cells) + f" | {ratio[li, 1]:.2f} |")
    # per-head allocation proxy at 3 equivalent bits per layer
    bits = {0: 2.0, 1: 3.0, 2: 4.0}  # K2V2, K4V2, K4V4 (indices into PAIRS)
    uniform = err[:, :, 1].sum().item()
    best_total = 0.0
    moved = 0
    for li in range(L):
        best = min((sum(err[li, h, a[h]].item() for h in range(H)), a)
                   for a in itertools.product(bits, repeat=H) if sum(bits[x] for x in a) == 3.0 * H)
        best_total += best[0]
        moved += any(x != 1 for x in best[1])
    layer_cost = err[:, :, [0, 1, 2]].sum(1)  # [L, 3]: every head of a layer on the same pair
    per_layer = budget_min(layer_cost.tolist(), H)
    per_head = budget_min(err[:, :, [0, 1, 2]].reshape(L * H, 3).tolist(), 1)
    q = torch.tensor([0.5, 0.9])
    summary = [
        f"SmolLM2-135M-Instruct, KIVI{' rotated' if args.rotation else ''}, {args.sequences} x 512 calibration "
        f"tokens, {L} layers x {H} KV heads; {seconds:.0f} s. kvtuner {kvtuner.__version__}, torch "
        f"{torch.__version__}.", "",
        f"* Spread across the heads of a layer (max/min relative error): median / 90th percentile over layers: "
        + "; ".join(f"{n} {torch.quantile(ratio[:, j], q)[0]:.2f} / {torch.quantile(ratio[:, j], q)[1]:.2f}"
                    for j, n in enumerate(names)) + ".",
        f"* Per-head proxy at 3 bits per layer: all heads K4V2 sum of errors {uniform:.3f}; best per-head mix of "
        f"K2V2/K4V2/K4V4 with the same bits {best_total:.3f} ({100 * (best_total / uniform - 1):+.1f} %); "
        f"{moved} of {L} layers would mix.",
        f"* Same proxy, one global budget of 3 bits on average (exact knapsack): all K4V2 {uniform:.3f}; best "
        f"per-layer pairs {per_layer:.3f} ({100 * (per_layer / uniform - 1):+.1f} %); best per-head pairs "
        f"{per_head:.3f} ({100 * (per_head / uniform - 1):+.1f} %). Per-head bits gain "
        f"{100 * (1 - per_head / per_layer):.1f} % over per-layer bits in this proxy.",
    ]
    text = "\n".join(["# Per-head sensitivity spread on SmolLM2", "", *summary, "",
                      f"Command: `python benchmarks/bench_heads.py --out {args.out} --sequences {args.sequences}"
                      f"{' --rotation' if args.rotation else ''}`", "", __doc__.split("\n", 3)[3], *lines]) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
