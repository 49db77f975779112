"""Greedy agreement of quantized-cache plans with the model's unquantized cache, on a real model.

    python benchmarks/bench_agreement.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda \
        --out benchmarks/results/agreement_smollm2_h100.md

Prompts are consecutive slices of held-out pydoc text (``--prompts`` x ``--prompt-len`` tokens, one
batch). Each plan generates ``--new-tokens`` greedy tokens through ``model.generate`` with a
`MixedPrecisionCache` (on CUDA: the fused Triton decode kernel; ``--backend torch`` forces the
reference) and is compared with the same model's DynamicCache: sequences identical, identical
prefix, and while both read the same tokens, KL and relative logit difference. The floor row is the
16-bit DynamicCache again under the MATH SDPA backend (rounding differences only).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import agreement  # noqa: E402
from bench_heldout import parse_plan  # noqa: E402

import kvtuner  # noqa: E402
from kvtuner import load_model, set_backend, with_cache  # noqa: E402
from kvtuner.data import default_texts  # noqa: E402


@torch.no_grad()
def graph_agreement(model, plan, ids: torch.Tensor, new_tokens: int, pad_token_id: int) -> dict:
    """Tokens of ``kvtuner.greedy_generate`` (CUDA-graph steps) vs ``model.generate`` with a DynamicCache."""
    from transformers import DynamicCache

    from kvtuner import MixedPrecisionCache, greedy_generate

    ref = model.generate(ids, **with_cache(model, DynamicCache(config=model.config)), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id,
                         attention_mask=torch.ones_like(ids))[:, ids.shape[1]:]
    got = greedy_generate(model, ids, MixedPrecisionCache(plan, model.config), new_tokens)
    same = (got == ref).int()
    prefix = same.cumprod(dim=1).sum(dim=1)
    return dict(prompts=ids.shape[0], prompt_len=ids.shape[1], new_tokens=new_tokens,
                all_match=int((prefix == new_tokens).sum()), mean_prefix=float(prefix.float().mean()),
                token_agreement=float(same.float().mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--plans", default="KV8,K8V4,KV4,K4V2")
    ap.add_argument("--mode", default="kivi")
    ap.add_argument("--backend", default="auto", help="kvtuner backend: auto (Triton on CUDA), torch or triton")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--graph", action="store_true",
                    help="also decode each plan with kvtuner.greedy_generate (steps replayed from a CUDA graph) and "
                         "compare its tokens with the same reference")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    set_backend(args.backend)
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    ids = tok(default_texts("evaluation"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    need = args.prompts * args.prompt_len
    if len(ids) < need:
        raise SystemExit(f"held-out text has {len(ids)} tokens; allowed: --prompts x --prompt-len <= that")
    prompts = ids[:need].view(args.prompts, args.prompt_len).to(args.device)
    n = model.config.num_hidden_layers
    rows = []
    for label in ["floor (MATH SDPA)"] + args.plans.split(","):
        plan = None if label.startswith("floor") else parse_plan(label, n, args.mode)[1]
        backend = "MATH" if plan is None else None
        r = agreement(model, plan, prompts, args.new_tokens, backend, pad_token_id=tok.pad_token_id)
        rows.append(dict(plan=label, **r))
        print(json.dumps(rows[-1]), flush=True)
        if args.graph and plan is not None:
            rows.append(dict(plan=f"{label} (CUDA graph)", **graph_agreement(model, plan, prompts, args.new_tokens,
                                                                             tok.pad_token_id)))
            print(json.dumps(rows[-1]), flush=True)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "CPU"
    lines = ["| plan | sequences identical | mean identical prefix | token agreement | mean KL (same prefix) | "
             "max rel. logit diff | median top-2 margin |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "mean_kl" not in r:  # graph rows compare tokens only (greedy_generate returns no logits)
            lines.append(f"| {r['plan']} | {r['all_match']}/{r['prompts']} | {r['mean_prefix']:.1f} / "
                         f"{r['new_tokens']} | {r['token_agreement']:.3f} | | | |")
            continue
        lines.append(f"| {r['plan']} | {r['all_match']}/{r['prompts']} | {r['mean_prefix']:.1f} / {r['new_tokens']} | "
                     f"{r['token_agreement']:.3f} | {r['mean_kl']:.2e} | {r['max_rel_logit_diff']:.3f} | "
                     f"{r['median_top2_margin']:.2f} |")
    text = "\n".join([
        f"# Greedy agreement with the unquantized cache ({args.model.split('/')[-1]}, {args.dtype}, {args.device})", "",
        f"Device: {dev}; torch {torch.__version__}, transformers {transformers.__version__}, kvtuner "
        f"{kvtuner.__version__}, backend {args.backend}. Command: `python benchmarks/bench_agreement.py --model "
        f"{args.model} --device {args.device} --dtype {args.dtype} --plans {args.plans} --mode {args.mode} "
        f"--backend {args.backend} --prompts {args.prompts} --prompt-len {args.prompt_len} --new-tokens "
        f"{args.new_tokens}{' --graph' if args.graph else ''}` ({time.perf_counter() - t0:.0f} s).", "",
        f"{args.prompts} prompts of {args.prompt_len} held-out pydoc tokens, {args.new_tokens} greedy tokens each, "
        "one batch through `model.generate`; reference: the same model with a DynamicCache (default SDPA).", "",
        *lines])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
