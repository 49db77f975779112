"""The Gluon decode kernel (``kernels/gluon_decode.py``) without a GPU: compiled for an H100 (sm_90), the
token loop over the packed history copies its tiles ahead with cp.async and reads them back straight into
the MMA operands' registers (no shared-memory stores, layout round trips or spills); and its operand index
maps, replayed on channel and token ids, agree with the storage layouts."""

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="needs Triton with Gluon (3.5+)")

from kvtuner import quant
from kvtuner.quant import to_token_pairs
from test_launch import _offline_sm90

CASES = [dict(kbits=4, vbits=4, stages=3), dict(kbits=8, vbits=8, stages=2), dict(kbits=4, vbits=2, stages=3),
         dict(kbits=2, vbits=2, stages=3), dict(kbits=8, vbits=4, stages=3),
         dict(kbits=4, vbits=4, value_pairs=False, has_mask=True, dev_len=True, stages=3),
         dict(kbits=4, vbits=4, group=16, stages=3), dict(kbits=2, vbits=8, group=1, stages=3),
         dict(kbits=4, vbits=4), dict(kbits=2, vbits=2), dict(kbits=4, vbits=2, value_pairs=False),
         dict(kbits=4, vbits=3), dict(kbits=4, vbits=3, stages=3)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_packed_token_loop_keeps_operands_off_round_trips(case):
    got = _offline_sm90(
        "from kvtuner.kernels.gluon_decode import split_kernel\n"
        f"ck = co.compile_gluon_sm90(split_kernel, *co.gluon_args(**{case!r}))\n"
        "sass, ops, usage = co.sass_summary(ck)\n"
        "print(json.dumps({'usage': usage, 'loops': [dict(c) for c in co.loops(sass)]}))\n")
    stack = int(got["usage"].split("STACK:")[1].split()[0])
    assert stack <= 64, got["usage"]  # a few spilled bytes at most, and none in the packed loop (below)

    staged = case.get("stages", 0) > 0

    def moved(c):  # shared-memory stores (layout conversions) and spills; plain loads: no shared memory at all
        return {op: n for op, n in c.items()
                if op.split(".")[0] in ("STS", "LDSM", "LDL", "STL") + (() if staged else ("LDS", "BAR"))}

    # the packed loop's mma.sync per 128-token tile and warp (32 tokens x 128 channels): scores 16, bias 16,
    # values 16 with up to 8 query heads (N = 8), twice that with 16; the residual window's loop (plain bf16
    # rows) converts its operands through shared memory
    wide = case.get("group", 4) > 8
    packed = [c for c in got["loops"] if c.get("HMMA.16816.F32") == (96 if wide else 48) and not moved(c)]
    assert len(packed) == 1, [sum(c.values()) for c in got["loops"]]
    ops = lambda name: sum(n for op, n in packed[0].items() if op.split(".")[0] == name)  # noqa: E731
    if staged:  # per tile: key and value codes and key scales/zeros by cp.async (value scales/zeros too when
        # in token pairs), one wait, at most two barriers, the staged bytes read back with LDS
        copies = (10 if case.get("value_pairs", True) else 2) + (4 if case.get("vbits") == 3 else 0)
        assert ops("LDGSTS") >= 8 + copies and ops("DEPBAR") == 1 and ops("BAR") <= 2 and ops("LDS") >= 16, packed[0]
    shuffles = sum(n for op, n in packed[0].items() if op.startswith("SHFL"))
    limit = (760 if staged else 700) if case.get("value_pairs", True) else 830  # values along head_dim: paired
    # in registers; 3-bit values join their 1-bit plane (a shift and a lop3 per code pair)
    limit += 160 if case.get("vbits") == 3 else 0
    assert shuffles <= (24 if wide else 12) and sum(packed[0].values()) < limit * (1.4 if wide else 1), (
        shuffles, sum(packed[0].values()))
    assert packed[0].get("MOVM.16.MT88", 0) == (8 if wide else 4)  # P^T: one movmatrix per 8 x 8 block


def _where_keys_sit(bits: int, d: int = 128):
    """(byte, code index) -> channel for keys in channel word order."""
    place = {}
    for c in range(d):
        marker = torch.zeros(1, 1, 1, d, dtype=torch.uint8)
        marker[..., c] = 1
        words = quant.to_channel_words(quant.pack(marker, bits), bits, d)[0, 0, 0]
        off = int(words.nonzero()[0])
        place[(off, int(words[off]).bit_length() - 1)] = c
    return place


def _join(codes):
    """The kernel's _dequant_last (scales aside): codes (one tensor per code of a byte) on new last dims."""
    if len(codes) == 1:
        return codes[0]
    if len(codes) == 2:
        return torch.stack(codes, -1)
    return torch.stack([torch.stack(codes[:2], -1), torch.stack(codes[2:], -1)], -1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_key_operand_holds_the_channels_q_is_permuted_to(bits):
    W, d, F, R = 4, 128, 8 // bits, 4 * bits
    kap = torch.arange(d)
    rest = kap >> 4
    ch = 32 * ((kap >> 1) & 3) + 4 * F * (rest // F) + 4 * (rest % F) + 2 * ((kap >> 3) & 1) + (kap & 1)
    assert sorted(ch.tolist()) == list(range(d))
    place = _where_keys_sit(bits)
    j, r = torch.arange(4)[:, None], torch.arange(R)[None, :]
    off = (j * R + r).expand(W, 4, 8, 4, R)  # [w nh nl j r]: the bytes each thread loads
    codes = [off.clone().apply_(lambda o, f=f: place[(o, f * bits)]) for f in range(F)]
    kd = _join(codes)
    if bits == 8:
        k_b = kd.reshape(W, 4, 8, 4, 8, 2, 2).permute(0, 4, 5, 3, 6, 1, 2).reshape(W, d, 32)
    elif bits == 4:
        k_b = kd.reshape(W, 4, 8, 4, 4, 2, 2, 2).permute(0, 4, 7, 5, 3, 6, 1, 2).reshape(W, d, 32)
    else:
        k_b = kd.reshape(W, 4, 8, 4, 2, 2, 2, 2, 2).permute(0, 4, 8, 7, 5, 3, 6, 1, 2).reshape(W, d, 32)
    assert torch.equal(k_b, ch[None, :, None].expand(W, d, 32))
    # a group's scale row as loaded [w, 4 j, 32] (channel 32 j + c), reordered to kappa for q' = q s
    s3 = (torch.arange(4)[:, None] * 32 + torch.arange(32)[None, :]).expand(W, 4, 32)
    s_k = s3.reshape(W, 4, 8, 2, 2).permute(0, 2, 3, 1, 4).reshape(W, d)
    assert torch.equal(s_k, ch.expand(W, d))
    # each code's power-of-two position in its byte (raw unpacking leaves 1024 + 2^(bits f) c): f of kappa
    fpos = (kap >> 4) % F
    for kp_, c in enumerate(ch.tolist()):
        (off, bit), = [key for key, chan in place.items() if chan == c]
        assert bit == bits * int(fpos[kp_])


def test_probabilities_reach_the_value_operand_through_8x8_transposes():
    """``_transpose_p``: after one movmatrix per 8 x 8 block of the score accumulator (``y[a0 + 8 a1, b + 8 nt]``
    holds ``p[8 a1 + b, a0 + 8 nt]``), the kernel's reshape and permute name every element as ``p`` does."""
    for bh in (8, 16):
        p = torch.arange(32 * bh).reshape(1, 32, bh)
        a = torch.arange(32)[:, None]
        c = torch.arange(bh)[None, :]
        a0, a1, b, nt = a % 8, a // 8, c % 8, c // 8
        y = p[0][8 * a1 + b, a0 + 8 * nt][None]
        x = y.reshape(1, 4, 8, bh // 8, 8).permute(0, 1, 4, 3, 2).reshape(1, 32, bh)
        assert torch.equal(x, p)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_value_operand_is_what_the_output_store_undoes(bits):
    W, d, F, X = 4, 128, 8 // bits, 4 * bits
    for c in (0, 1, 5, 127):  # values packed along head_dim: code f of byte c holds channel F c + f
        marker = torch.zeros(1, d, dtype=torch.uint8)
        marker[0, c] = 1
        packed = quant.pack(marker, bits)[0]
        assert int(packed[c // F]) == 1 << (bits * (c % F)) and int(packed.sum()) == int(packed[c // F])
    tokens = torch.arange(32)[:, None].expand(32, d // F)  # one warp's 32 tokens, bytes along head_dim
    byte = torch.arange(d // F)[None, :].expand(32, d // F)
    pair_tok = to_token_pairs(tokens[None, None].contiguous()).reshape(-1)  # token pairs: contiguous blocks
    pair_byte = to_token_pairs(byte[None, None].contiguous()).reshape(-1)
    nh, nlh, u, x = (torch.arange(n).reshape(*([1] * i), n, *([1] * (3 - i))) for i, n in enumerate((4, 4, 8, X)))
    off = ((nh * 8 + nlh * 2) * (d // F) + u * X + x).expand(4, 4, 8, X)  # [nh nlh u x] as the kernel reads
    tok = pair_tok[off].reshape(1, 4, 4, 8, X // 2, 2).expand(W, 4, 4, 8, X // 2, 2)
    chans = [(F * pair_byte[off] + f).reshape(1, 4, 4, 8, X // 2, 2).expand(W, 4, 4, 8, X // 2, 2)
             for f in range(F)]
    order = {8: [0, 1, 2, 5, 4, 3], 4: [0, 1, 2, 5, 4, 6, 3], 2: [0, 1, 2, 5, 4, 7, 6, 3]}[bits]
    v_ch = _join(chans).permute(*order).reshape(W, 32, d)  # then transposed to the A operand [w, nu, token]
    v_tok = _join([tok] * F).permute(*order).reshape(W, 32, d)
    nu = torch.arange(d)
    assert torch.equal(v_ch, (16 * (nu & 7) + (nu >> 3)).expand(W, 32, d))  # the output store's channel
    assert torch.equal(v_tok, torch.arange(32)[None, :, None].expand(W, 32, d))  # the keys' token order (nh 8 + nl)
    # value scales in token pairs: (pair, group, token of the pair) at 2 * group + parity of the pair's 8
    ids = (torch.arange(32)[:, None] * 4 + torch.arange(4)[None, :])[None, None]  # token * 4 + group
    flat = to_token_pairs(ids).reshape(-1)
    first, grp, par = torch.arange(0, 32, 2)[:, None, None], torch.arange(4)[None, :, None], torch.arange(2)
    assert torch.equal(flat[first * 4 + 2 * grp + par], (first + par) * 4 + grp)
    # the residual window: plain rows [w n u c'] (channel 16u + c') to the same nu order
    rc = (torch.arange(8)[:, None] * 16 + torch.arange(16)[None, :]).reshape(1, 1, 8, 16).expand(W, 32, 8, 16)
    rv = rc.reshape(W, 32, 8, 8, 2).permute(0, 1, 3, 4, 2).reshape(W, 32, d)
    assert torch.equal(rv, (16 * (nu & 7) + (nu >> 3)).expand(W, 32, d))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_folded_key_scores_are_as_close_as_dequantized_fp16_keys(bits):
    """The kernel's key arithmetic, emulated with its roundings: codes stay fp16 ``1024 + f c``; ``q' = fp16(q s
    FMAX / f)`` per group; one bias from the same fp16 ``q'``; products exact, sums in fp32. Its scores must be
    as close to the exact dequantized scores as those of keys dequantized to fp16 (what a per-code kernel does)."""
    torch.manual_seed(bits)
    d, n, heads = 128, 256, 4
    k = torch.randn(1, 1, n, d) * 0.5 + torch.randn(1, 1, 1, d) * 3  # channel offsets, as real keys have
    q = torch.randn(heads, d) * 2
    kp = quant.quantize(k.to(torch.bfloat16), bits, "per_channel", 32)
    codes = quant.unpack(kp.codes, bits, d)[0, 0].double()  # [n, d]
    s = kp.scale[0, 0].double().repeat_interleave(32, 0)  # [n, d]: the group's per-channel scale
    z = kp.zero[0, 0].double().repeat_interleave(32, 0)
    qk = q.double() * (d ** -0.5 * 1.4426950408889634)
    exact = (s * codes + z) @ qk.T  # [n, heads], log2 units
    fp16_keys = ((s * codes + z).half().float() @ qk.half().float().T).double()
    F = 8 // bits
    fmax = {8: 1, 4: 16, 2: 64}[bits]
    f = 2.0 ** (bits * ((torch.arange(d) % (4 * F)) // 4))  # the code's position in its byte
    qg = (qk * (fmax / f)).half()  # [heads, d]
    q_b = (qk * fmax).half()
    scores = torch.empty(n, heads, dtype=torch.float64)
    for g in range(n // 32):
        rows = slice(32 * g, 32 * g + 32)
        q1 = (qg.float() * s[32 * g].half().float()).half().double()  # q' of this group, fp16
        bias = (z[32 * g].half().double() @ q_b.double().T) - 1024 * q1.sum(1)  # [heads]
        raw = (1024 + f * codes[rows]).half().double()  # exact in fp16: integers below 2048
        scores[rows] = (raw @ q1.T + bias) / fmax
    scale = exact.abs().max()
    err_folded = (scores - exact).abs().max() / scale
    err_fp16 = (fp16_keys - exact).abs().max() / scale
    assert err_folded <= 2 * err_fp16 + 1e-4, (err_folded.item(), err_fp16.item())


def test_staged_launch_fills_whole_waves_of_resident_programs():
    from kvtuner.kernels.gluon_decode import _default_splits, _resident

    # registers (168 per thread up to 4-bit codes and 8 heads) and the staged tiles bound residency
    assert _resident(4, 4, 8, True, 3) == 3 and _resident(2, 2, 8, True, 3) == 3
    assert _resident(8, 8, 8, True, 2) == 2 and _resident(8, 8, 8, True, 3) == 1 and _resident(4, 4, 16, True, 3) == 2
    assert _resident(4, 3, 8, True, 3) == 2
    # few rows (1 x 131072, 8 KV heads): one wave, splits beside each row's residual program
    assert _default_splits(8, 1024, 396) == 48 and _default_splits(8, 3, 396) == 3
    # many rows (64 x 4096): the split count whose last wave is fullest (512 x 3 = 1536 of 4 x 396)
    assert _default_splits(512, 32, 396) == 3 and _default_splits(512, 32, 264) == 1


def test_three_bit_values_meet_their_high_bits_in_token_pairs():
    """3-bit values (bit planes) in token pairs, read as the kernel does: a thread's 8 bytes of the 2-bit plane
    (``[2-bit byte xb, token xp]``) and 4 bytes of the 1-bit plane (``[B, token]``, duplicated so that byte
    ``xb`` sees ``B = xb // 2``); ``ptx.ASM3TP`` takes bit ``4 (xb % 2) + f`` of that byte as code ``f``'s high
    bit. Every code must come out as stored, at the token and channel the 2-bit map names."""
    d = 128
    codes = torch.randint(0, 8, (1, 1, 32, d), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    rows = quant.pack(codes, 3)
    assert rows.shape[-1] == 48  # the 2-bit plane (32 bytes), then the 1-bit plane (16)
    paired = to_token_pairs(rows).reshape(-1).long()
    nh, nlh, u, x = (torch.arange(n).reshape(*([1] * i), n, *([1] * (3 - i))) for i, n in enumerate((4, 4, 8, 8)))
    base = (nh * 8 + nlh * 2) * 48  # the pair's first byte
    lo = paired[base + u * 8 + x].reshape(4, 4, 8, 4, 2)  # [nh nlh u xb xp]
    h = paired[(base + 64 + u * 4 + x[..., :4]).expand(4, 4, 8, 4)].reshape(4, 4, 8, 2, 2)  # [.. B token]
    h8 = torch.stack([h, h], -1).permute(0, 1, 2, 3, 5, 4).reshape(4, 4, 8, 4, 2)  # as the kernel's join
    xb, xp = torch.arange(4)[:, None], torch.arange(2)[None, :]
    tok = (nh * 8 + nlh * 2)[..., None] + xp  # [4 4 1 1 2]
    for f in range(4):
        got = ((lo >> 2 * f) & 3) | (((h8 >> (4 * (xb % 2) + f)) & 1) << 2)
        ch = 16 * u[..., None] + 4 * xb + f  # [1 1 8 4 1]: the 2-bit map's channel
        want = codes[0, 0][tok.expand(4, 4, 8, 4, 2), ch.expand(4, 4, 8, 4, 2)].long()
        assert torch.equal(got, want)


HOST_RUN = '''
import types, torch
from kvtuner import quant
from kvtuner.kernels import decode_kernel, gluon_decode as gd
real, seen = gd.split_kernel, []
class Launch:  # compiles the split kernel for sm_90 with the wrapper's exact arguments instead of launching
    def __init__(self, gluon):
        self.gluon = gluon
    def __getitem__(self, grid):
        def run(*args, **kw):
            if self.gluon:
                ck = co.compile_gluon_sm90(real, args, dict(kw))
                seen.append(dict(grid=list(grid), usage=co.sass_summary(ck)[2], smem=ck.metadata.shared,
                                 **{k: v for k, v in kw.items() if k in ("STAGES", "VPAIRS", "DEV_LEN", "maxnreg")}))
            else:
                seen.append(dict(grid=list(grid), num_splits=args[7], res_splits=kw["RES_SPLITS"]))
        return run
gd.split_kernel, decode_kernel.merge_kernel = Launch(True), Launch(False)
torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=132)
b, hkv, n, kbits, vbits, kw = CASE
k = torch.randn(b, hkv, n + 32, 128, dtype=torch.bfloat16)
q = torch.randn(b, hkv * 4, 1, 128, dtype=torch.bfloat16)
kp = quant.in_channel_words(quant.quantize(k[..., :n, :], kbits, "per_channel", 32))
vp = quant.in_token_pairs(quant.quantize(k[..., :n, :], vbits, "per_token", 32))
if "lengths" in kw:
    kw["lengths"] = torch.tensor(kw["lengths"], dtype=torch.int32)
gd.decode_attention(q, kp, k[..., n:, :], vp, k[..., n:, :], 0.1, **kw)
print(json.dumps(seen))
'''


@pytest.mark.parametrize("case,splits", [
    ((1, 8, 8192, 2, 2, {"stages": 3}), 32),  # one wave: 396 resident programs, 8 rows, whole 128-token tiles
    ((64, 8, 1024, 4, 2, {"stages": 3}), 3),  # many rows: the fullest last wave
    ((2, 8, 4096, 4, 3, {}), 16),  # plain loads: about three programs per SM under the register cap
    ((2, 8, 1024, 4, 3, {"stages": 3, "lengths": [5, 17]}), 8),
])
def test_host_wrapper_launches_what_the_kernel_compiles(case, splits):
    split, merge = _offline_sm90(f"CASE = {case!r}\n" + HOST_RUN)
    b, hkv, n, kbits, vbits, kw = case
    stages = kw.get("stages", 0)
    assert split["grid"] == [b * hkv, splits + 1] and split["STAGES"] == stages and split["VPAIRS"]
    assert split["DEV_LEN"] == ("lengths" in kw)
    assert merge == {"grid": [b * hkv * 4], "num_splits": splits + 1, "res_splits": 1}  # one row per program
    if vbits != 3:  # two- and four-bit codes: three programs per SM fit (registers capped at 168)
        assert split["maxnreg"] == 168 and "REG:168 " in split["usage"]
    if stages:
        assert split["smem"] == stages * (2048 * (kbits + vbits) + 2048 + 4096)  # the ring (the merge reuses it)
