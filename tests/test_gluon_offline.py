"""The Gluon KV4 decode prototype, compiled for an H100 (sm_90) on a machine without a GPU: the token loop
over the packed history keeps every operand in registers (no shared memory, no barrier, no spill)."""

import pytest

pytest.importorskip("triton.experimental.gluon", reason="needs Triton with Gluon (3.5+)")

from test_launch import _offline_sm90


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


def test_operand_index_maps_agree_with_the_storage_layouts():
    # the kernel's reshape/permute/join chains, replayed on channel and token ids with torch's identical logical
    # semantics: every key operand element is the channel q is permuted to, every value element is the
    # channel the output store undoes, and each warp reads its own 32 tokens in one order for keys and values
    import torch

    from kvtuner import quant
    from kvtuner.kernels.gluon_kv4 import value_token_pairs

    W, d = 4, 128
    kap = torch.arange(d)
    ch = 32 * ((kap >> 1) & 3) + 8 * (kap >> 5) + 4 * ((kap >> 4) & 1) + 2 * ((kap >> 3) & 1) + (kap & 1)
    assert sorted(ch.tolist()) == list(range(d))
    # keys in channel word order: where does each channel's code sit (byte, nibble)?
    lo_ch, hi_ch = {}, {}
    marker = torch.zeros(d, dtype=torch.uint8)
    for c in range(d):  # locate channel c: set only its code to 1
        marker.zero_()
        marker[c] = 1
        w = quant.to_channel_words(quant.pack(marker[None, None, None], 4), 4, d)[0, 0, 0]
        off = int(w.nonzero()[0])
        (lo_ch if w[off] == 1 else hi_ch)[off] = c
    assert len(lo_ch) == len(hi_ch) == 64
    lo = torch.tensor([lo_ch[o] for o in range(64)])
    hi = torch.tensor([hi_ch[o] for o in range(64)])
    j, r = torch.arange(4)[:, None], torch.arange(16)[None, :]
    kbyte = (j * 16 + r).expand(W, 4, 8, 4, 16)  # [w nh nl j r] as the kernel indexes them
    k_lo, k_hi = lo[kbyte], hi[kbyte]
    k8 = torch.stack([k_lo, k_hi], -1).reshape(W, 4, 8, 4, 4, 2, 2, 2)
    k_b = k8.permute(0, 4, 7, 5, 3, 6, 1, 2).reshape(W, d, 32)
    assert torch.equal(k_b, ch[None, :, None].expand(W, d, 32))
    # key scale rows split as the kernel splits them (_lo_hi): the same channels as the codes they scale
    s5 = (torch.arange(4)[:, None] * 32 + torch.arange(32)[None, :]).reshape(1, 1, 1, 4, 32).expand(4, 1, 1, 4, 32)
    s6 = s5.reshape(4, 1, 1, 4, 4, 2, 4).permute(0, 1, 2, 3, 4, 6, 5).reshape(4, 1, 1, 4, 16, 2)
    assert torch.equal(s6[..., 0].expand_as(k_lo), k_lo) and torch.equal(s6[..., 1].expand_as(k_hi), k_hi)
    # values: codes of token t, channel c at (row t, byte c // 2, nibble c % 2), then interleaved by token pairs
    tok = torch.arange(32).repeat_interleave(d).reshape(1, 1, 32, d)
    chan = torch.arange(d).repeat(32).reshape(1, 1, 32, d)
    pos_tok = value_token_pairs(tok[..., ::2].contiguous())  # [.., 32 rows, 64 bytes] token of each byte
    pos_byte = value_token_pairs((chan[..., ::2] // 2).contiguous())
    flat_tok, flat_byte = pos_tok.reshape(-1), pos_byte.reshape(-1)  # pairs are contiguous 128-byte blocks
    nh, nlh, u, x = (torch.arange(n).reshape(*([1] * i), n, *([1] * (3 - i))) for i, n in enumerate((4, 4, 8, 16)))
    pair_first = nh * 8 + nlh * 2
    off = (pair_first * 64 + u * 16 + x).expand(4, 4, 8, 16)
    v_tok = flat_tok[off].reshape(1, 4, 4, 8, 8, 2).expand(W, 4, 4, 8, 8, 2)
    v_byte = flat_byte[off].reshape(1, 4, 4, 8, 8, 2).expand(W, 4, 4, 8, 8, 2)
    v7_ch = torch.stack([2 * v_byte, 2 * v_byte + 1], -1)
    v7_tok = torch.stack([v_tok, v_tok], -1)
    v_b_ch = v7_ch.permute(0, 1, 2, 5, 4, 6, 3).reshape(W, 32, d)
    v_b_tok = v7_tok.permute(0, 1, 2, 5, 4, 6, 3).reshape(W, 32, d)
    nu = torch.arange(d)
    assert torch.equal(v_b_ch, (16 * (nu & 7) + (nu >> 3)).expand(W, 32, d))  # the output store's channel
    assert torch.equal(v_b_tok, torch.arange(32)[None, :, None].expand(W, 32, d))  # n: the keys' token order
    n_keys = (torch.arange(4)[:, None] * 8 + torch.arange(8)[None, :]).reshape(-1)  # k_b's n = nh * 8 + nl
    assert torch.equal(n_keys, torch.arange(32))
    # value scales in token pairs: (pair, group, token of the pair) at 2 * group + parity of the pair's 8
    ids = (torch.arange(32)[:, None] * 4 + torch.arange(4)[None, :])[None, None]  # token * 4 + group
    flat = value_token_pairs(ids).reshape(-1)
    first, grp, par = torch.arange(0, 32, 2)[:, None, None], torch.arange(4)[None, :, None], torch.arange(2)
    assert torch.equal(flat[first * 4 + 2 * grp + par], (first + par) * 4 + grp)
    # the residual: rows [w n u c'] with channel 16u + c', permuted to kappa and nu order
    rc = (torch.arange(8)[:, None] * 16 + torch.arange(16)[None, :]).reshape(1, 1, 8, 16).expand(W, 32, 8, 16)
    rk = rc.reshape(W, 32, 4, 2, 2, 2, 2, 2).permute(0, 3, 4, 5, 6, 2, 7, 1).reshape(W, d, 32)
    assert torch.equal(rk, ch[None, :, None].expand(W, d, 32))
    rv = rc.reshape(W, 32, 8, 8, 2).permute(0, 1, 3, 4, 2).reshape(W, 32, d)
    assert torch.equal(rv, (16 * (nu & 7) + (nu >> 3)).expand(W, 32, d))
