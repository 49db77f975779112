"""Compile the decode kernel for an H100 (sm_90) on a machine with no GPU, and count its SASS.

    PYTHONPATH=src python benchmarks/compile_offline.py --pairs 44,33 [--launch '{"unpack3_k": "planes"}'] [--dump DIR]

Registers, spills and shared-memory instruction widths decide this kernel's speed (Nsight Compute:
docs/kernels.md), and all three are fixed at compile time, so variants can
be screened here before spending GPU time. The launch arguments are the ones ``decode_attention``
builds for B=64, L=4096, Llama-3.1-8B shape (CPU tensors stand in; their values are never read).
Triton's bundled ptxas and nvdisasm do the rest.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from kvtuner import quant
from kvtuner.kernels import Target, plan_launch
from kvtuner.kernels.decode_kernel import split_kernel

TARGET = GPUTarget("cuda", 90, 32)
SASS_OP = re.compile(r"^\s*(?:[-\w:]+\s+)?(?:/\*[0-9a-f]+\*/\s+)?(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)\b",
                     re.MULTILINE)


def launch_args(kbits: int, vbits: int, b: int = 64, n: int = 4096, hkv: int = 8, group: int = 4, d: int = 128,
                token_block: int = 0, key_words: bool = False, kv_group: int = 128, value_words: bool = False,
                **launch) -> tuple[tuple, dict]:
    k = torch.randn(1, hkv, 256, d, dtype=torch.bfloat16)  # as the benchmarks: bf16 model (scales/zeros in fp16, quant.meta_dtype)
    # KIVI with G = kv_group: keys per channel over G tokens, values per token over G channels
    kp = quant.quantize(k, kbits, "per_channel", kv_group).map(lambda x: x.repeat(b, 1, n // 256, 1))
    vp = quant.quantize(k, vbits, "per_token", kv_group if kv_group < d else None).map(
        lambda x: x.repeat(b, 1, n // 256, 1))
    vp.token_block = token_block  # the layout of the codes changes nothing the compiler sees but VT
    kp.channel_words = key_words  # ... and KWORDS
    vp.channel_words = value_words  # ... and VWORDS
    kr = torch.randn(b, hkv, 32, d, dtype=torch.bfloat16)
    q = torch.randn(b, hkv * group, 1, d, dtype=torch.bfloat16)
    launch = plan_launch(q, kp, kr, vp, kr, d**-0.5, target=Target(132, True, "h100"), **launch)
    return launch.split_args, launch.split_kwargs


def compile_sm90(args: tuple, kwargs: dict):
    """The split kernel compiled as Triton would for these arguments on an H100."""
    kernel = split_kernel
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, None)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def compile_gluon_sm90(kernel, args: tuple, kwargs: dict):
    """A Gluon kernel compiled as Triton would for these arguments on an H100."""
    from triton.experimental.gluon._runtime import GluonASTSource

    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, None)
    return triton.compile(GluonASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                          options=options.__dict__)


def gluon_args(b: int = 64, n: int = 4096, hkv: int = 8, group: int = 4, d: int = 128, kbits: int = 4,
                   vbits: int = 4, value_pairs: bool = True, has_mask: bool = False,
                   dev_len: bool = False, stages: int = 0) -> tuple[tuple, dict]:
    """Launch arguments of ``kernels.gluon_decode.split_kernel`` at Llama-3.1-8B shape (CPU stand-ins)."""
    q = torch.empty(b, hkv * group, 1, d, dtype=torch.bfloat16)
    kc = torch.empty(b, hkv, n, 16 * kbits, dtype=torch.uint8)
    vc = torch.empty(b, hkv, n, 16 * vbits, dtype=torch.uint8)
    ks = torch.empty(b, hkv, n // 32, d, dtype=torch.float16)
    vs = torch.empty(b, hkv, n, 4, dtype=torch.float16)
    kr = torch.empty(b, hkv, 64, d, dtype=torch.bfloat16)
    po = torch.empty(16, dtype=torch.float32)
    mask = torch.empty(b, n + 64, dtype=torch.uint8)
    lens = torch.empty(2, dtype=torch.int32)
    args = (q, q, kc, ks, ks, vc, vs, vs, kr, kr, mask, lens, po, po, po, q.stride(0), q.stride(1), q.stride(0),
            q.stride(1), *kc.stride()[:3], *ks.stride()[:3], *vc.stride()[:3], *vs.stride()[:3], *kr.stride()[:3],
            *kr.stride()[:3], mask.stride(0), n, 40, 1024, 4, 0.1, 0.1, hkv, group, 20)
    return args, dict(num_warps=4, KBITS=kbits, VBITS=vbits, VPAIRS=value_pairs, HAS_MASK=has_mask,
                      DEV_LEN=dev_len, BH=8 if group <= 8 else 16, STAGES=stages)


def _opcodes(text: str) -> collections.Counter:
    return collections.Counter(m.group(1) for m in SASS_OP.finditer(text) if not m.group(1).startswith("."))


def sass_summary(compiled) -> tuple[str, collections.Counter, str]:
    """SASS text, its opcode counts, and cuobjdump's resource line (registers, stack = spills, shared)."""
    import subprocess
    import tempfile

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", f.name], check=True, capture_output=True, text=True).stdout
        res = subprocess.run([str(tools / "cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
    ops = _opcodes(sass)
    usage = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", res)
    return sass, ops, usage.group(0) if usage else res.strip()


def loops(sass: str) -> list[collections.Counter]:
    """Opcode counts of every loop in ``sass`` (a label and the last branch back to it), longest first."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\s*(\.L_x_\d+):", line))}
    spans = {}
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            spans[m.group(1)] = (labels[m.group(1)], i)
    ordered = sorted(spans.values(), key=lambda span: span[0] - span[1])  # stable: the first of equal spans
    return [_opcodes("\n".join(lines[a:b + 1])) for a, b in ordered]


def main_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest loop in ``sass`` (from a label to the last branch back to it):
    the token loop, whose length per tile decides decode time once the kernel is issue-bound."""
    found = loops(sass)
    return found[0] if found else _opcodes(sass.splitlines()[0] if sass else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="44,33")
    ap.add_argument("--launch", default="{}", help="JSON overrides of decode_attention's launch choices")
    ap.add_argument("--token-block", type=int, default=0, help="values in token blocks of this many tokens")
    ap.add_argument("--key-words", action="store_true", help="keys in channel word order (quant.to_channel_words)")
    ap.add_argument("--group", type=int, default=128, help="KIVI group size G (the plans' default is 32)")
    ap.add_argument("--value-words", action="store_true", help="3-bit values as contiguous words (quant.to_channel_words)")
    ap.add_argument("--dump", default=None, help="directory for each variant's ttgir and SASS")
    args = ap.parse_args()
    for pair in args.pairs.split(","):
        a, kw = launch_args(int(pair[0]), int(pair[1]), token_block=args.token_block, key_words=args.key_words,
                            kv_group=args.group, value_words=args.value_words, **json.loads(args.launch))
        ck = compile_sm90(a, kw)
        sass, ops, usage = sass_summary(ck)
        smem = sum(v for k, v in ops.items() if k.startswith(("STS", "LDS", "STSM", "LDSM")))
        loop = main_loop(sass)
        print(f"K{pair[0]}V{pair[1]} {args.launch} token_block={args.token_block} key_words={args.key_words} "
              f"value_words={args.value_words}: {usage} (dynamic shared {ck.metadata.shared} B), "
              f"{sum(ops.values())} SASS instructions ({sum(loop.values())} in the token loop), {smem} shared-memory ones: "
              + ", ".join(f"{k} {v}" for k, v in sorted(ops.items()) if k.startswith(("STS", "LDS", "STL", "LDL"))))
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            Path(args.dump, f"K{pair[0]}V{pair[1]}.ttgir").write_text(ck.asm["ttgir"])
            Path(args.dump, f"K{pair[0]}V{pair[1]}.sass").write_text(sass)


if __name__ == "__main__":
    main()
