"""Query-aware key rounding on SmolLM2: held-out KL of uniform plans with nearest and with query-aware key codes.

    python benchmarks/bench_key_rounding.py --out benchmarks/results/cpu/key_rounding_smollm2.md

Per layer first: each layer's attention-output error from its quantized keys alone (the profile's key
error, rotated KIVI storage, one sink token) on held-out windows, with query-aware over nearest codes, at
2, 3, 4 and 8 bits; the moments come from the calibration windows, so this is out of sample. Then end
to end: the moments come from `kvtuner tune`'s calibration windows (4 x 512 tokens of the built-in
text's calibration part); quality is `kvtuner tune`'s held-out protocol (16 windows of a 256-token
prefill and 64 teacher-forced decode steps), each plan paired window by window with uniform KV4 (nearest
rounding, plain KIVI storage: the reference of every report). The same bytes per token either way: only
the codes differ.
"""

from __future__ import annotations

import argparse
import time

import torch
from provenance import provenance, publish

from kvtuner import KVPlan, load_model
from kvtuner.data import default_texts
from kvtuner.evaluation import Evaluator
from kvtuner.pipeline import TuneSettings
from kvtuner.profiling import calibration_batches, profile
from kvtuner.rounding import query_moments

# (k bits, v bits, rotation, sink tokens)
UNIFORM = ((4, 4, False, 0), (4, 4, True, 1), (4, 3, True, 1), (3, 3, True, 1), (3, 3, False, 1), (4, 2, True, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    t0 = time.perf_counter()
    s = TuneSettings()
    model, tok = load_model("smollm2")
    n = model.config.num_hidden_layers
    rounding = query_moments(model, calibration_batches(tok, default_texts("calibration"), s.sequences, s.seq_len))
    tables = [profile(model, tok, default_texts("evaluation"), pairs=[(3, 3)], modes=["kivi"],
                      num_sequences=s.sequences, seq_len=s.seq_len, rotation=True, sink_length=1, progress=False,
                      key_rounding=kr) for kr in (None, rounding)]
    per_layer = []
    for j, b in enumerate(tables[0].bits):
        ratio = torch.tensor(tables[1].key_error["kivi"]).T[j] / torch.tensor(tables[0].key_error["kivi"]).T[j]
        per_layer.append((b, ratio))
        print(b, ratio.tolist(), flush=True)
    ev = Evaluator(model, tok, default_texts("evaluation"), windows=s.eval_windows, prefill=s.eval_prefill,
                   decode=s.eval_decode, prompts=0, passkey_lengths=(), progress=False)
    ref = ev(KVPlan.uniform(n, 4, 4, "kivi"), label="KV4")
    rows = []
    for k, v, rot, sink in UNIFORM:
        plan = KVPlan.uniform(n, k, v, "kivi", rotation=rot, sink_length=sink)
        name = f"K{k}V{v}" + ("r" if rot else "") + (f"s{sink}" if sink else "")
        res = {}
        for label, p in (("nearest", plan), ("query-aware", plan.with_key_rounding(rounding))):
            r = ev(p, label=f"{name} {label}")
            res[label] = (r.kl, r.kl_ratio_interval(ref))
        aware = res["query-aware"][0]
        rows.append((name, plan.equivalent_bits, res["nearest"], res["query-aware"], aware / res["nearest"][0]))
        print(rows[-1], flush=True)

    def fmt(kl_ratio):
        kl, (g, lo, hi) = kl_ratio
        return f"{kl:.4f} | {g:.2f} [{lo:.2f}, {hi:.2f}]"

    lines = ["| plan | bits | KL, nearest | KL / KV4, nearest | KL, query-aware | KL / KV4, query-aware | "
             "query-aware / nearest |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {bits:.2f} | {fmt(a)} | {fmt(b)} | {ratio:.2f} |" for name, bits, a, b, ratio in rows]
    layer_lines = ["| key bits | layers with lower error | query-aware / nearest: min | median | max |",
                   "|---|---|---|---|---|"]
    layer_lines += [f"| {b} | {int((r < 1).sum())} of {len(r)} | {r.min():.2f} | {r.median():.2f} | {r.max():.2f} |"
                    for b, r in per_layer if b < 16]
    text = "\n".join([
        "# Query-aware key rounding on SmolLM2 (per layer, and held-out KL of uniform plans)", "",
        f"Command: `python benchmarks/bench_key_rounding.py`. {provenance()}; "
        f"{time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads.", "",
        "## Per layer: attention-output error from quantized keys alone", "",
        f"Held-out windows ({s.sequences} x {s.seq_len} tokens of the evaluation text; the moments come from the "
        "calibration windows), rotated KIVI keys, one sink token, values in full precision: each layer's "
        "relative attention-output error with query-aware codes over that with nearest codes.", "",
        *layer_lines, "",
        "## End to end: held-out KL", "",
        f"SmolLM2-135M-Instruct (fp32 weights from the Q4_1 GGUF). Query second moments from {s.sequences} "
        f"calibration windows of {s.seq_len} tokens; {s.eval_windows} held-out windows of {s.eval_prefill} "
        f"prefill + {s.eval_decode} decode tokens. KL / KV4: paired with uniform KV4 (nearest rounding, plain, "
        "no sink), geometric mean of per-window ratios [+-2 s.e.]. r: Hadamard-rotated storage; s1: one sink "
        "token. Query-aware rounding changes only the key codes (same scales, zeros and bytes).", "", *lines])
    publish(text, args.out)


if __name__ == "__main__":
    main()
