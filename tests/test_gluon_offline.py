"""The Gluon KV4 decode prototype, compiled for an H100 (sm_90) on a machine without a GPU: its token loop
keeps every operand in registers (no shared memory, no barrier, no spill)."""

import pytest

pytest.importorskip("triton.experimental.gluon", reason="needs Triton with Gluon (3.5+)")

from test_launch import _offline_sm90  # noqa: E402


def test_token_loop_has_no_shared_memory_round_trip():
    got = _offline_sm90(
        "from kvtuner.kernels.gluon_kv4 import kv4_split_kernel\n"
        "ck = co.compile_gluon_sm90(kv4_split_kernel, *co.kv4_gluon_args())\n"
        "sass, ops, usage = co.sass_summary(ck)\n"
        "loop = co.main_loop(sass)\n"
        "print(json.dumps({'usage': usage, 'hmma': ops.get('HMMA.16816.F32', 0), 'loop': dict(loop)}))\n")
    loop = got["loop"]
    moved = {op: c for op, c in loop.items() if op.split(".")[0] in ("LDS", "STS", "LDSM", "BAR", "LDL", "STL")}
    assert "STACK:0 " in got["usage"] + " " and got["hmma"] == 64, got["usage"]
    assert not moved and sum(loop.values()) < 1000, (moved, sum(loop.values()))
