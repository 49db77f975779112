"""Rotation as a per-layer choice: plain and rotated tables of SmolLM2, solved together.

    python benchmarks/bench_rotation_choice.py --out-dir benchmarks/results/cpu

Profiles SmolLM2 (KIVI) twice, without and with Hadamard rotation, over every (k, v) pair of
``--bits``, with one-layer KL (``--kl-seq-len`` calibration tokens) as each (layer, pair) cost;
saves both tables; then solves the exact budget problem for three candidate sets: plain pairs only,
rotated pairs only (what ``--rotation`` searches), and both (each layer picks plain or rotated per
pair, `search(..., rotated=...)`). Prints the proxy (summed one-layer KL) of the best plan at each
budget and saves the per-layer-choice plans; evaluate them on held-out text with
``bench_heldout.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvtuner import load_model, profile
from kvtuner.data import default_texts
from kvtuner.profiling import calibration_batches, layer_kl
from kvtuner.search import search

BUDGETS = (3.25, 4.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="benchmarks/results/cpu")
    ap.add_argument("--bits", default="8,4,3,2")
    ap.add_argument("--kl-seq-len", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=1, help="attention-error profiling windows (KL is the cost)")
    args = ap.parse_args()
    out = Path(args.out_dir)
    model, tok = load_model("smollm2")
    calib = default_texts("calibration")
    bits = [int(b) for b in args.bits.split(",")]
    pairs = [(k, v) for k in bits for v in bits]
    kl_batch = calibration_batches(tok, calib, 1, args.kl_seq_len)
    tables, seconds = {}, {}
    for rot in (False, True):
        t0 = time.perf_counter()
        tab = profile(model, tok, calib, pairs=pairs, modes=["kivi"], num_sequences=args.sequences, seq_len=512,
                      model_id="smollm2", rotation=rot)
        tab.kl = layer_kl(model, kl_batch, pairs, ["kivi"], rotation=rot)
        seconds[rot] = time.perf_counter() - t0
        tab.save(out / f"smollm2-b{''.join(map(str, bits))}{'-rot' if rot else ''}.kvtable.json")
        tables[rot] = tab
    fronts = {"plain": search(tables[False], mode="kivi", cluster=False, progress=False),
              "rotated": search(tables[True], mode="kivi", cluster=False, progress=False),
              "per-layer choice": search(tables[False], mode="kivi", cluster=False, progress=False,
                                         rotated=tables[True])}
    rows = []
    for name, front in fronts.items():
        for budget in BUDGETS:
            best = min((p for p in front.points if p.equivalent_bits <= budget), key=lambda p: p.proxy_error)
            n_rot = sum(layer.k.rotation for layer in best.plan.layers)
            rows.append(dict(candidates=name, budget=budget, bits=best.equivalent_bits, proxy=best.proxy_error,
                             rotated_layers=n_rot, pairs=[layer.name for layer in best.plan.layers]))
            if name == "per-layer choice":
                best.plan.save(out / f"smollm2-rotchoice.plan-{budget}.json")
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| candidates | budget | bits | summed one-layer KL (proxy) | rotated layers |", "|---|---|---|---|---|"]
    lines += [f"| {r['candidates']} | {r['budget']} | {r['bits']:.2f} | {r['proxy']:.4f} | {r['rotated_layers']}/30 |"
              for r in rows]
    text = "\n".join([
        "# Rotation as a per-layer choice (SmolLM2, KIVI)", "",
        f"Command: `python benchmarks/bench_rotation_choice.py --out-dir {args.out_dir} --bits {args.bits} "
        f"--kl-seq-len {args.kl_seq_len} --sequences {args.sequences}`. Profiling + one-layer KL: plain "
        f"{seconds[False]:.0f} s, rotated {seconds[True]:.0f} s ({torch.get_num_threads()} CPU threads).", "",
        "Exact budget solver over each layer's measured one-layer KL (the proxy the search starts from):", "",
        *lines, "", "Chosen per-layer-choice plans: " + "; ".join(
            f"<= {r['budget']}: {', '.join(r['pairs'])}" for r in rows if r["candidates"] == "per-layer choice")])
    (out / "rotation_choice_smollm2.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
