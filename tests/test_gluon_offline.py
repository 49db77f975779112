"""The Gluon KV4 decode prototype, compiled for an H100 (sm_90) on a machine without a GPU: the token loop
over the packed history keeps every operand in registers (no shared memory, no barrier, no spill)."""

import pytest

pytest.importorskip("triton.experimental.gluon", reason="needs Triton with Gluon (3.5+)")

from test_launch import _offline_sm90  # noqa: E402


def test_packed_token_loop_has_no_shared_memory_round_trip():
    got = _offline_sm90(
        "from kvtuner.kernels.gluon_kv4 import kv4_split_kernel\n"
        "ck = co.compile_gluon_sm90(kv4_split_kernel, *co.kv4_gluon_args())\n"
        "sass, ops, usage = co.sass_summary(ck)\n"
        "print(json.dumps({'usage': usage, 'loops': [dict(c) for c in co.loops(sass)]}))\n")
    assert "STACK:0 " in got["usage"] + " ", got["usage"]
    # the packed loop: 64 mma.sync per 128-token tile (4 warps x 32 tokens x 128 channels, keys and values)
    packed = [c for c in got["loops"] if c.get("HMMA.16816.F32") == 64 and c.get("LOP3.LUT", 0) >= 64]
    assert len(packed) == 1, [sum(c.values()) for c in got["loops"]]
    loop = packed[0]
    moved = {op: n for op, n in loop.items() if op.split(".")[0] in ("LDS", "STS", "LDSM", "BAR", "LDL", "STL")}
    shuffles = sum(n for op, n in loop.items() if op.startswith("SHFL"))
    assert not moved and shuffles <= 8 and sum(loop.values()) < 1000, (moved, shuffles, sum(loop.values()))
