"""Each stage of the default `kvtuner tune --device cuda`, timed: on a Llama-3.1-8B-shaped model or a given one.

    python benchmarks/bench_tune_gpu.py --work /tmp/kvt8b --out benchmarks/results/h100/tune_8b.md
    python benchmarks/bench_tune_gpu.py --model /tmp/smollm2.gguf --tune-out /tmp/smol \
        --out benchmarks/results/h100/tune_smollm2.md

No hub is reachable from the GPU machine, so the model is built here: Llama-3.1-8B's shape (32 layers,
32 query heads, 8 KV heads, head_dim 128, vocabulary 128,256) with random bf16 weights, saved with a
byte-level BPE tokenizer trained on the built-in pydoc text. Then the command a user runs,
`kvtuner tune --model DIR --device cuda --out OUT`, runs as a subprocess; each log line is timestamped,
so each stage's time is the gap to the next line. Its last log line gives the peak GPU memory.
Random weights make the quality numbers meaningless; the times and memory are those of a real 8B model.
With ``--model`` (a directory, .gguf or built-in name) that model is tuned instead and its quality numbers count.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")


def save_model(work: Path, layers: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bench_decode import build
    from kvtuner.data import default_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([default_texts("calibration"), default_texts("evaluation")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(work)
    torch.manual_seed(0)
    model = build(layers)
    model.config.eos_token_id = model.config.bos_token_id = fast.eos_token_id
    model.generation_config.eos_token_id = model.generation_config.bos_token_id = fast.eos_token_id
    model.save_pretrained(work, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()


def run_tune(model_dir: Path, out: Path, extra: list[str]) -> tuple[list[tuple[float, str]], float, int]:
    cmd = [sys.executable, "-c", "from kvtuner.cli import main; main()", "tune", "--model", str(model_dir),
           "--device", "cuda", "--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = []
    for raw in proc.stderr:
        line = raw.rstrip("\n").split("\r")[-1].strip()
        if line and "%|" not in line and "it/s]" not in line:  # log lines, not progress bars
            lines.append((time.perf_counter() - t0, line))
            print(f"{lines[-1][0]:7.1f} s  {line}", flush=True)
    stdout = proc.stdout.read()
    proc.wait()
    print(stdout)
    return lines, time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/kvt8b", help="where the model directory is written")
    ap.add_argument("--tune-out", default="", help="kvtuner tune's --out (default: WORK/tune)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--model", default="", help="tune this model instead of building the 8B-shaped one")
    ap.add_argument("--out", default="")
    ap.add_argument("extra", nargs="*", help="more kvtuner tune options (after --)")
    args = ap.parse_args()
    from provenance import provenance, publish

    work = Path(args.work)
    model_dir = Path(args.model) if args.model else work / "model"
    t = time.perf_counter()
    if not args.model and not (model_dir / "config.json").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        save_model(model_dir, args.layers)
    build_s = time.perf_counter() - t
    out = Path(args.tune_out or work / "tune")
    lines, total, rc = run_tune(model_dir, out, args.extra)
    rows = [(text, (lines[i + 1][0] if i + 1 < len(lines) else total) - at) for i, (at, text) in enumerate(lines)]
    title = f"`{model_dir.name}`" if args.model else "a Llama-3.1-8B-shaped model (random bf16 weights)"
    md = [f"# `kvtuner tune --device cuda` on {title}", "",
          f"Command: `python benchmarks/bench_tune_gpu.py {' '.join(sys.argv[1:])}`, which runs `kvtuner tune --model "
          f"DIR --device cuda --out OUT{' ' + ' '.join(args.extra) if args.extra else ''}` (default settings). "
          f"{provenance()}.", "",
          f"Exit code {rc}; wall time of the command {total:.0f} s (building and saving the model beforehand: "
          f"{build_s:.0f} s, not part of it). Each stage lasts until the next log line.", "",
          "| from log line | seconds |", "|---|---|"]
    md += [f"| {text} | {secs:.1f} |" for text, secs in rows]
    report = out / "report.md"
    if report.exists():
        md += ["", "The report's recommendation and quality table" + ("" if args.model else
               " (random weights: the numbers show the pipeline ran, not what a trained 8B model would get)") + ":", ""]
        body = report.read_text().split("## Memory")[0].split("\n", 1)[1]
        md += [body.strip()]
    text = "\n".join(md) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
