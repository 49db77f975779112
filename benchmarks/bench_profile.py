"""Profile SmolLM2's per-layer sensitivity and check it against end-to-end layer KL.

    python benchmarks/bench_profile.py --out-dir benchmarks/results/cpu

1. `kvtuner.profile` over both modes, all 9 pairs, all 30 layers, 8 x 512 calibration tokens:
   wall time and the table (`smollm2.kvtable.json`).
2. The end-to-end KL of quantizing one layer alone at K2 (V16) and at V2 (K16), on 2 x 512 tokens,
   and its Spearman correlation across layers with the profiled attention-output error.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import kvtuner
from kvtuner import load_model
from kvtuner.data import default_texts
from kvtuner.profiling import calibration_batches, layer_kl, profile, spearman


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="benchmarks/results/cpu")
    ap.add_argument("--kl-sequences", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out_dir)
    model, tok = load_model("smollm2")
    calib = default_texts("calibration")
    t0 = time.perf_counter()
    table = profile(model, tok, calib, num_sequences=8, seq_len=512, model_id="smollm2")
    seconds = time.perf_counter() - t0
    table.save(out / "smollm2.kvtable.json")

    t1 = time.perf_counter()
    batches = calibration_batches(tok, calib, args.kl_sequences, 512)
    kl = layer_kl(model, batches, [(2, 16), (16, 2)], ["kivi", "per_token"])
    kl_seconds = time.perf_counter() - t1
    rows = []
    for mode in ("kivi", "per_token"):
        j = table.bits.index(2)
        k_err = [table.key_error[mode][layer][j] for layer in range(30)]
        v_err = [table.value_error[mode][layer][j] for layer in range(30)]
        rows.append(dict(mode=mode, tensor="K2", spearman=spearman(k_err, kl[mode]["K2V16"]),
                         top_layers_error=sorted(range(30), key=lambda i: -k_err[i])[:5],
                         top_layers_kl=sorted(range(30), key=lambda i: -kl[mode]["K2V16"][i])[:5]))
        rows.append(dict(mode=mode, tensor="V2", spearman=spearman(v_err, kl[mode]["K16V2"]),
                         top_layers_error=sorted(range(30), key=lambda i: -v_err[i])[:5],
                         top_layers_kl=sorted(range(30), key=lambda i: -kl[mode]["K16V2"][i])[:5]))
    (out / "smollm2.layer_kl.json").write_text(json.dumps(kl, indent=1) + "\n")
    env = (f"kvtuner {kvtuner.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
           f"{torch.get_num_threads()} CPU threads ({platform.machine()})")
    lines = [
        "# Profiling SmolLM2-135M-Instruct", "",
        f"Command: `python benchmarks/bench_profile.py --out-dir {args.out_dir}`. {env}.", "",
        f"* `kvtuner.profile`: 2 modes x 9 pairs x 30 layers on 8 x 512 calibration tokens: **{seconds:.1f} s** "
        "wall time (one capturing forward per sequence, then offline maths). Table: `smollm2.kvtable.json`.",
        f"* End-to-end layer KL (one layer quantized alone, K2V16 and K16V2, both modes, "
        f"{args.kl_sequences} x 512 tokens): {kl_seconds:.1f} s. Values: `smollm2.layer_kl.json`.", "",
        "Spearman correlation across the 30 layers between the profiled relative attention-output error "
        "(key-only or value-only at 2 bits) and the KL of quantizing that layer alone:", "",
        "| mode | tensor | Spearman | 5 layers with largest error | 5 layers with largest KL |",
        "|---|---|---|---|---|",
        *[f"| {r['mode']} | {r['tensor']} | {r['spearman']:.3f} | {r['top_layers_error']} | {r['top_layers_kl']} |"
          for r in rows],
    ]
    (out / "profile_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(dict(profile_seconds=seconds, kl_seconds=kl_seconds, rows=rows)))


if __name__ == "__main__":
    main()
