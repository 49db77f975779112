"""The inline-PTX unpackers of the decode kernel, run through a small PTX emulator on the CPU.

CI has no GPU, so the bit tricks (``prmt`` byte moves, ``lop3`` mask-and-exponent, packed fp16
FMAs) are checked here instruction by instruction against the codes they must produce; the GPU
tests then check the same strings inside the kernel.
"""

import re

import numpy as np
import pytest

pytest.importorskip("triton", reason="needs Triton (pip install 'kvtuner[dev]')")

from kvtuner.kernels import ptx  # noqa: E402


def _f16(bits: int) -> float:
    return float(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])


def _bits(x: float) -> int:
    return int(np.array([x], dtype=np.float16).view(np.uint16)[0])


def emulate(asm: str, inputs: list[int]) -> dict[str, int]:
    """Registers after running ``asm`` with ``inputs`` in the operands after the outputs.

    Covers the instructions the unpackers use: mov.b32, prmt.b32 (default mode), lop3.b32 with
    0xea = (a & b) | c, and f16x2 sub/fma with one rounding per lane (exact for these operands).
    """
    n_out = max(int(t[1:]) for t in re.findall(r"\$\d+", asm)) + 1 - len(inputs)
    regs = {f"${n_out + i}": v for i, v in enumerate(inputs)}

    def val(x: str) -> int:
        return int(x, 16) if x.startswith("0x") else int(x) if x.isdigit() else regs[x]

    def lanes(op, *xs):
        return sum(_bits(op(*(_f16(x >> 16 * i) for x in xs))) << 16 * i for i in range(2))

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, rest = line.split(None, 1)
        a = [x.strip() for x in rest.split(",")]
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "prmt.b32":
            src, sel = val(a[1]) | val(a[2]) << 32, val(a[3])
            regs[a[0]] = sum(((src >> 8 * ((sel >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op == "shr.b32":
            regs[a[0]] = val(a[1]) >> val(a[2])
        elif op == "shl.b32":
            regs[a[0]] = (val(a[1]) << val(a[2])) & 0xFFFFFFFF
        elif op == "lop3.b32":
            assert a[4] == "0xea", "only (a & b) | c is emulated"
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "sub.f16x2":
            regs[a[0]] = lanes(lambda x, y: x - y, val(a[1]), val(a[2]))
        elif op == "fma.rn.f16x2":
            regs[a[0]] = lanes(lambda x, y, z: x * y + z, val(a[1]), val(a[2]), val(a[3]))
        else:
            raise AssertionError(f"instruction {op} is not emulated")
    return regs


def outputs(regs: dict[str, int], first: int, count: int) -> list[float]:
    """``count`` fp16 values from consecutive output registers starting at ``$first``."""
    return [_f16(regs[f"${first + i // 2}"] >> 16 * (i % 2)) for i in range(count)]


RNG = np.random.default_rng(0)
WORDS = [int(x) for x in RNG.integers(0, 2**32, size=64, dtype=np.uint64)] + [0, 0xFFFFFFFF]


@pytest.mark.parametrize("word", WORDS[:24] + WORDS[-2:])
def test_ptx_byte_planes(word):
    data = [(word >> 8 * i) & 0xFF for i in range(4)]  # four packed bytes per call, byte i -> element i
    assert outputs(emulate(ptx.ASM8.value, [word]), 0, 4) == data
    r4 = emulate(ptx.ASM4.value, [word])
    assert outputs(r4, 0, 4) == [b & 15 for b in data] and outputs(r4, 2, 4) == [b >> 4 for b in data]
    r2 = emulate(ptx.ASM2.value, [word])
    for p in range(4):  # code position p of every byte
        assert outputs(r2, 2 * p, 4) == [(b >> 2 * p) & 3 for b in data]
    r1 = emulate(ptx.ASM1X4.value, [word])
    for k in range(8):  # the high plane of 3-bit codes: bit k of every byte, times 4
        assert outputs(r1, 2 * k, 4) == [4 * ((b >> k) & 1) for b in data]


def _three_bit_lanes(asm: str, n: int, high_at: int, inputs) -> None:
    """Random 3-bit codes, ``n`` per lane (low bits of code k at 2k, high bit at ``high_at + k``),
    two lanes per call; ``inputs`` turns the two lane values into the call's operands. Output k
    must hold code k of lane 0 (low half) and of lane 1 (high half), exactly."""
    codes = RNG.integers(0, 8, size=(400, 2, n))
    codes[0], codes[1] = 0, 7
    for c in codes:
        lanes = [sum(int(c[e, k] & 3) << 2 * k | int(c[e, k] >> 2) << high_at + k for k in range(n)) for e in range(2)]
        regs = emulate(asm, inputs(*lanes))
        for k in range(n):
            assert outputs(regs, k, 2) == [c[0, k], c[1, k]]


def test_ptx_three_bit_codes_exact():
    # words: 8 codes' low bits in 16 bits, their high bits in the byte above; one word per operand
    _three_bit_lanes(ptx.ASM3.value, 8, 16, lambda w0, w1: [w0, w1])


def test_emulator_refuses_unknown_instructions():
    with pytest.raises(AssertionError, match="not emulated"):
        emulate("{\nadd.s32 $0, $1, 1;\n}", [3])


def test_ptx_three_bit_nibbles_exact():
    # byte + nibble: 4 codes per 16-bit element, two elements packed in one operand
    _three_bit_lanes(ptx.ASM3N.value, 4, 8, lambda e0, e1: [e0 | e1 << 16])


def test_ptx_contiguous_three_bit_words_exact():
    # 3-bit keys in word order (quant.to_channel_words): 8 codes contiguous in 24 bits, one word per operand
    codes = RNG.integers(0, 8, size=(400, 2, 8))
    codes[0], codes[1] = 0, 7
    for c in codes:
        regs = emulate(ptx.ASM3C.value, [sum(int(c[e, k]) << 3 * k for k in range(8)) for e in range(2)])
        for k in range(8):
            assert outputs(regs, k, 2) == [c[0, k], c[1, k]]


def test_ptx_three_bit_token_pairs_exact():
    # 3-bit values as planes in token pairs: 2-bit plane bytes [b0 t0, b0 t1, b1 t0, b1 t1] (channels 4 b + f),
    # the 1-bit plane's byte of those 8 channels per token (bit 4 j + f: channel 4 j + f's high bit)
    codes = RNG.integers(0, 8, size=(300, 2, 8))  # [token, channel]
    codes[0], codes[1] = 0, 7
    for c in codes:
        lo = [[sum(int(c[t, 4 * j + f] & 3) << 2 * f for f in range(4)) for j in range(2)] for t in range(2)]
        hi = [sum(int(c[t, k] >> 2) << k for k in range(8)) for t in range(2)]
        x = lo[0][0] | lo[1][0] << 8 | lo[0][1] << 16 | lo[1][1] << 24
        junk = int(RNG.integers(0, 2**16))
        regs = emulate(ptx.ASM3TP.value, [x, hi[0] | hi[1] << 8 | junk << 16])
        for f in range(4):
            for j in range(2):
                assert outputs(regs, 2 * f + j, 2) == [c[0, 4 * j + f], c[1, 4 * j + f]]
