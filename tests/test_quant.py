"""The reference quantizer: bit-exact packing, the scale/2 error bound, edge cases, and KIVI
semantics against an independent loop implementation."""

import pytest
import torch

from kvtuner import quant
from kvtuner.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("dim", [1, 3, 60, 64, 80, 96, 129, 256])
def test_pack_unpack_round_trip_is_bit_exact(bits, dim):
    codes = torch.randint(0, 2**bits, (2, 3, 17, dim), dtype=torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == quant.packed_width(dim, bits)
    if dim % 8 == 0:  # really packed: exactly bits/8 bytes per code (3-bit codes take 3 bits)
        assert packed.shape[-1] * 8 == dim * bits
    assert torch.equal(quant.unpack(packed, bits, dim), codes)


def test_three_and_six_bit_planes_match_docstring():
    codes = torch.tensor([[5, 2, 7, 0, 1, 6, 3, 4]], dtype=torch.uint8)  # 3-bit: low 2 bits, then the high bit
    low = [c & 3 for c in codes[0].tolist()]
    high = [c >> 2 for c in codes[0].tolist()]
    want = [low[0] | low[1] << 2 | low[2] << 4 | low[3] << 6, low[4] | low[5] << 2 | low[6] << 4 | low[7] << 6,
            sum(h << i for i, h in enumerate(high))]
    assert quant.pack(codes, 3)[0].tolist() == want
    six = torch.tensor([[45, 18]], dtype=torch.uint8)  # 6-bit: low 4 bits plane, then the high 2 bits
    assert quant.pack(six, 6)[0].tolist() == [45 & 15 | (18 & 15) << 4, 45 >> 4 | (18 >> 4) << 2]


@pytest.mark.parametrize("dim", [8, 64, 128])
def test_hadamard_rotation_is_orthonormal_and_preserves_dot_products(dim):
    h = quant.hadamard(dim)
    assert torch.allclose(h @ h.T, torch.eye(dim), atol=1e-6) and torch.equal(h, h.T)
    q, k = torch.randn(5, dim), torch.randn(7, dim)
    assert torch.allclose(quant.rotate(q) @ quant.rotate(k).T, q @ k.T, atol=1e-4)
    assert torch.allclose(quant.rotate(quant.rotate(k)), k, atol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        quant.hadamard(96)


def test_rotation_in_row_chunks_matches_one_matmul(monkeypatch):
    x = torch.randn(3, 2, 37, 64, dtype=torch.bfloat16)[:, :, 5:]  # a non-contiguous view
    whole = quant.rotate(x)
    monkeypatch.setattr(quant, "ROTATE_CHUNK", 64 * 10)  # 10 rows per chunk, with a short last chunk
    chunked = quant.rotate(x)
    assert chunked.shape == x.shape and chunked.dtype == x.dtype and torch.equal(chunked, whole)
    assert torch.equal(quant.rotate(x, torch.float32), (x.float() @ quant.hadamard(64)))


def test_rotation_spreads_channel_outliers():
    x = torch.randn(4, 256, 64)
    x[..., 3] *= 30  # one outlier channel, as keys have
    direct = quant.fake_quantize(x, 4, "per_token")
    rotated = quant.rotate(quant.fake_quantize(quant.rotate(x), 4, "per_token"))
    assert (rotated - x).norm() < 0.5 * (direct - x).norm()


def test_bit_layout_matches_docstring():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert quant.pack(codes, 2).item() == 1 | 2 << 2 | 3 << 4
    assert quant.pack(torch.tensor([[5, 10]], dtype=torch.uint8), 4).item() == 5 | 10 << 4


def _per_element(p: torch.Tensor, qt: quant.QuantizedTensor, shape) -> torch.Tensor:
    t, d = shape[-2], shape[-1]
    g = qt.group_size
    if qt.granularity == "per_token":
        return p.float().repeat_interleave(g, dim=-1)[..., :d]
    return p.float().repeat_interleave(g, dim=-2)[..., :t, :]


CASES = [("per_token", None), ("per_token", 32), ("per_token", 24), ("per_channel", 32), ("per_channel", 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("granularity, group", CASES)
@pytest.mark.parametrize("dim", [64, 80, 96, 256])
def test_error_within_half_scale(dtype, bits, granularity, group, dim):
    x = torch.randn(2, 2, 45, dim) * torch.linspace(0.1, 8, dim)  # channel outliers, tails along T and D
    x = x.to(dtype)
    qt = quant.quantize(x, bits, granularity, group)
    meta = torch.float32 if dtype == torch.float32 else torch.float16  # bf16 inputs too (quant.meta_dtype)
    assert qt.scale.dtype == meta and qt.zero.dtype == meta
    y = quant.dequantize(qt, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    half_scale = _per_element(qt.scale, qt, x.shape) / 2
    out_rounding = y.float().abs() * torch.finfo(dtype).eps  # final cast of x_hat to dtype
    err = (y.float() - x.float()).abs()
    excess = err - (half_scale * (1 + 1e-5) + out_rounding + 1e-7)
    assert excess.max() <= 0, f"worst excess {excess.max().item():.3e}"


@pytest.mark.parametrize("granularity", ["per_token", "per_channel"])
def test_constant_groups_are_exact(granularity):
    x = torch.full((1, 2, 64, 64), 0.3, dtype=torch.bfloat16)
    x[..., 32:, 32:] = -7.25
    for bits in (2, 4, 8):
        qt = quant.quantize(x, bits, granularity, 32)
        assert torch.equal(quant.dequantize(qt, x.dtype), x)  # bf16 values are exact in fp16 metadata
        assert (qt.scale == 0).all()


def test_metadata_dtype_choice_and_override():
    x = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16) * 3
    default, kept = quant.quantize(x, 4, "per_channel", 32), quant.quantize(x, 4, "per_channel", 32, torch.bfloat16)
    assert default.scale.dtype == torch.float16 and kept.scale.dtype == torch.bfloat16
    assert default.nbytes() == kept.nbytes()  # same 2 bytes per scale/zero
    # fp16 keeps 3 more mantissa bits: the outward-rounded scales are tighter, so the error is not larger
    err = [(quant.dequantize(q, torch.float32) - x.float()).abs().mean().item() for q in (default, kept)]
    assert err[0] <= err[1]
    assert quant.quantize(x.float(), 4).scale.dtype == torch.float32
    with pytest.raises(ValueError, match="meta=torch.int8 is invalid"):
        quant.quantize(x, 4, meta=torch.int8)


def test_fp16_metadata_saturates_out_of_range_groups():
    # bf16 reaches 3e38, fp16 stops at 65504: a group beyond that keeps finite metadata and clamps
    x = torch.tensor([[[-1e5, 0.5, 2.0, 1e5], [1.0, 2.0, 3.0, 4.0]]], dtype=torch.bfloat16)
    qt = quant.quantize(x, 8)
    assert torch.isfinite(qt.scale.float()).all() and torch.isfinite(qt.zero.float()).all()
    assert qt.zero[0, 0, 0].item() == -65504.0
    y = quant.dequantize(qt, torch.float32)
    assert torch.isfinite(y).all() and y[0, 0, 0].item() == -65504.0  # the one element below the range
    assert (y[0, 0, 1:] - x[0, 0, 1:].float()).abs().max() <= qt.scale[0, 0, 0].float() / 2
    assert (y[0, 1] - x[0, 1].float()).abs().max() <= qt.scale[0, 1, 0].float() / 2  # in-range rows as usual


def test_bits_improve_error_monotonically():
    x = torch.randn(1, 4, 128, 64)
    errs = [(quant.fake_quantize(x, b, "per_channel", 32) - x).norm().item() for b in (2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] > 0
    assert torch.equal(quant.fake_quantize(x, 16), x)


def test_tail_group_uses_only_real_elements():
    # A tail group of 3 tokens must not see padding: its range is exactly the tail's range.
    x = torch.zeros(1, 1, 35, 4)
    x[..., 32:, :] = torch.tensor([1.0, 2.0, 4.0]).view(3, 1)
    qt = quant.quantize(x, 2, "per_channel", 32)
    assert qt.scale.shape == (1, 1, 2, 4)
    assert torch.allclose(qt.zero[..., 1, :], torch.tensor(1.0)) and torch.allclose(qt.scale[..., 1, :],
                                                                                     torch.tensor(1.0))


def _kivi_keys_loop(x: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Straightforward KIVI key quantization: each channel, each block of g tokens, its own min/max."""
    out = torch.empty_like(x)
    levels = 2**bits - 1
    for s in range(0, x.shape[-2], g):
        blk = x[..., s:s + g, :]
        mn = blk.min(dim=-2, keepdim=True).values
        scale = (blk.max(dim=-2, keepdim=True).values - mn) / levels
        q = torch.where(scale > 0, (blk - mn) / scale, 0).round().clamp(0, levels)  # 1-token tail: range 0
        out[..., s:s + g, :] = q * scale + mn
    return out


def _per_token_loop(x: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    out = torch.empty_like(x)
    levels = 2**bits - 1
    for s in range(0, x.shape[-1], g):
        blk = x[..., s:s + g]
        mn = blk.min(dim=-1, keepdim=True).values
        scale = (blk.max(dim=-1, keepdim=True).values - mn) / levels
        out[..., s:s + g] = ((blk - mn) / scale).round().clamp(0, levels) * scale + mn
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("tokens", [64, 65, 70])
def test_kivi_matches_independent_loop(bits, tokens):
    x = torch.randn(2, 3, tokens, 96) * torch.linspace(0.5, 6, 96)
    assert_close("kivi keys", _kivi_keys_loop(x, bits, 32), quant.fake_quantize(x, bits, "per_channel", 32), 1e-6)
    assert_close("kivi values", _per_token_loop(x, bits, 32), quant.fake_quantize(x, bits, "per_token", 32), 1e-6)


def test_no_group_straddles_two_channels():
    # The official code reshapes the flat [D, T] buffer into rows of 32, mixing channels when T % 32 != 0.
    x = torch.zeros(1, 1, 40, 2)
    x[..., 1] = 1000.0  # channel 1 is huge and constant; channel 0 is all zeros
    y = quant.fake_quantize(x, 2, "per_channel", 32)
    assert torch.equal(y, x)


@pytest.mark.parametrize("bad, kwargs, err", [
    ("bits", dict(bits=5), ValueError), ("granularity", dict(granularity="per_head"), ValueError),
    ("group_size", dict(group_size=0), ValueError),
])
def test_quantize_rejects_bad_arguments(bad, kwargs, err):
    args = dict(bits=4, granularity="per_token", group_size=None) | kwargs
    with pytest.raises(err, match=bad):
        quant.quantize(torch.randn(1, 1, 4, 8), **args)
    with pytest.raises(TypeError, match="floating-point"):
        quant.quantize(torch.ones(1, 1, 4, 8, dtype=torch.int32), 4)


def test_slice_and_cat_preserve_groups():
    x = torch.randn(1, 2, 96, 64)
    qt = quant.quantize(x, 4, "per_channel", 32)
    parts = [quant.slice_tokens(qt, 0, 32), quant.slice_tokens(qt, 32, 96)]
    assert torch.equal(quant.dequantize(quant.cat(parts)), quant.dequantize(qt))
    with pytest.raises(ValueError, match="multiples of group_size"):
        quant.slice_tokens(qt, 5, 96)


# ------------------------------------------------------------------ token blocks (values read by the GPU kernel)
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_token_blocks_round_trip_with_the_same_bytes(bits, block):
    qt = quant.quantize(torch.randn(2, 3, 2 * block, 64), bits, "per_token", 32)
    tb = quant.in_token_blocks(qt, block)
    assert tb.codes.shape == qt.codes.shape and tb.codes.dtype == torch.uint8 and tb.nbytes() == qt.nbytes()
    assert not torch.equal(tb.codes, qt.codes)  # really re-laid
    assert torch.equal(quant.from_token_blocks(tb.codes, bits, 64, block), qt.codes)
    assert torch.equal(quant.dequantize(tb), quant.dequantize(qt))


def _code_at(row: list[int], pos: int, w: int, pairs: bool = False) -> int:
    """Element ``pos`` of a plane's row, read the way the docstrings of to_token_blocks (``pairs``: 3-bit
    codes in a token block) and to_channel_words say."""
    if pairs:  # pair order: in every 16 elements e = 8 u + 2 f + k
        group, e = divmod(pos, 16)
        u, rest = divmod(e, 8)
        f, k = divmod(rest, 2)
        if w == 2:  # code f of byte 2 u + k
            return (row[4 * group + 2 * u + k] >> (2 * f)) & 3
        return (row[2 * group + k] >> (2 * f + 1 - u)) & 1  # bit 2 f + 1 - u of byte k
    per = 8 // w
    word, e = divmod(pos, 4 * per)
    f, k = divmod(e, 4)
    return (row[4 * word + k] >> (w * f)) & ((1 << w) - 1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_token_block_layout_matches_docstring(bits):
    block, dim = 32, 16
    qt = quant.quantize(torch.randn(1, 1, 2 * block, dim), bits, "per_token", None)
    codes = quant.unpack(qt.codes, bits, dim)[0, 0]  # [T, D]
    flat = quant.to_token_blocks(qt.codes, bits, dim, block)[0, 0].reshape(2, -1).tolist()  # bytes per block
    order = quant.block_order(block).tolist()
    for b in range(2):
        col, shift = 0, 0
        for w in quant.PLANES[bits]:
            for ch in range(dim):
                start = block * col + ch * block * w // 8
                row = flat[b][start:start + block * w // 8]
                for pos in range(block):
                    want = (int(codes[b * block + order[pos], ch]) >> shift) & ((1 << w) - 1)
                    assert _code_at(row, pos, w, pairs=bits == 3) == want
            col, shift = col + dim * w // 8, shift + w


def test_block_order_gives_each_lane_group_contiguous_tokens():
    for block in (32, 64, 128):
        order = quant.block_order(block)
        assert sorted(order.tolist()) == list(range(block))
        run = block // 4  # lane group c reads positions [c * run, (c + 1) * run)
        for c in range(4):
            tokens = order[c * run:(c + 1) * run]
            assert all((t % 8) // 2 == c for t in tokens.tolist())  # tokens 2c, 2c+1 (+8) of every slab


def test_token_blocks_reject_bad_shapes_and_slices():
    qt = quant.quantize(torch.randn(1, 1, 64, 64), 4, "per_token")
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.to_token_blocks(qt.codes, 4, 64, 16)
    with pytest.raises(ValueError, match="not a multiple of the token block"):
        quant.to_token_blocks(qt.codes[..., :48, :], 4, 64, 32)
    tb = quant.in_token_blocks(qt, 32)
    assert torch.equal(quant.dequantize(quant.slice_tokens(tb, 32, 64)), quant.dequantize(qt)[..., 32:, :])
    with pytest.raises(ValueError, match="multiples of the token block 32"):
        quant.slice_tokens(tb, 0, 40)
    with pytest.raises(ValueError, match="different layouts"):
        quant.cat([tb, qt])
    assert quant.cat([tb, tb]).token_block == 32
    with pytest.raises(ValueError, match="already re-laid"):
        quant.in_token_blocks(tb, 32)
    with pytest.raises(ValueError, match="already re-laid"):
        quant.in_channel_words(tb)


@pytest.mark.parametrize("bits,dim", [(2, 64), (3, 64), (3, 24), (4, 8), (4, 64), (6, 32), (8, 16)])
def test_channel_words_round_trip_and_layout(bits, dim):
    qt = quant.quantize(torch.randn(2, 3, 40, dim), bits, "per_channel", 32)
    worded = quant.to_channel_words(qt.codes, bits, dim)
    assert worded.shape == qt.codes.shape and torch.equal(quant.from_channel_words(worded, bits, dim), qt.codes)
    wq = quant.in_channel_words(qt)
    assert torch.equal(wq.codes, worded) and wq.channel_words
    assert torch.equal(quant.dequantize(wq), quant.dequantize(qt)) and wq.nbytes() == qt.nbytes()
    codes = quant.unpack(qt.codes, bits, dim)[0, 0, 0].tolist()
    row = worded[0, 0, 0].tolist()
    if bits == 3:  # contiguous 24-bit words: low 16 bits in the 2-bit plane's bytes, high 8 in the 1-bit plane's
        for u in range(dim // 8):
            word = row[2 * u] | row[2 * u + 1] << 8 | row[dim // 4 + u] << 16
            assert [(word >> 3 * k) & 7 for k in range(8)] == codes[8 * u:8 * u + 8]
        return
    col, shift = 0, 0
    for w in quant.PLANES[bits]:  # code f of byte k of each word holds channel 4f + k of the word
        plane = row[col:col + dim * w // 8]
        assert all(_code_at(plane, ch, w) == (codes[ch] >> shift) & ((1 << w) - 1) for ch in range(dim))
        col, shift = col + dim * w // 8, shift + w
    with pytest.raises(ValueError, match="multiple of 16"):
        quant.to_channel_words(quant.quantize(torch.randn(1, 1, 4, 8), 2).codes, 2, 8)


# ------------------------------------------------------------------ token pairs (values read by the Gluon kernel)
def test_token_pairs_interleave_rows_and_dequantize_the_same():
    qt = quant.quantize(torch.randn(2, 3, 64, 128), 4, "per_token", 32)
    tp = quant.in_token_pairs(qt)
    assert tp.token_pairs and tp.nbytes() == qt.nbytes() and tp.codes.shape == qt.codes.shape
    # token 2p + x, column c -> element 2c + x of the pair's two rows
    flat = tp.codes[0, 0, 6:8].reshape(-1)
    assert torch.equal(flat[0::2], qt.codes[0, 0, 6]) and torch.equal(flat[1::2], qt.codes[0, 0, 7])
    assert torch.equal(tp.scale[0, 0, 6:8].reshape(-1)[1::2], qt.scale[0, 0, 7])
    assert torch.equal(quant.from_token_pairs(tp.codes), qt.codes)
    assert torch.equal(quant.dequantize(tp), quant.dequantize(qt))
    parts = [quant.slice_tokens(tp, 0, 32), quant.slice_tokens(tp, 32, 64)]
    assert torch.equal(quant.dequantize(quant.cat(parts)), quant.dequantize(qt))
    with pytest.raises(ValueError, match="even ends"):
        quant.slice_tokens(tp, 3, 64)
    with pytest.raises(ValueError, match="different layouts"):
        quant.cat([quant.slice_tokens(qt, 0, 32), parts[1]])
    with pytest.raises(ValueError, match="whole token pairs"):
        quant.to_token_pairs(torch.zeros(1, 1, 3, 8))
    with pytest.raises(ValueError, match="per_token"):
        quant.in_token_pairs(quant.quantize(torch.randn(1, 1, 64, 128), 4, "per_channel", 32))
    with pytest.raises(ValueError, match="already re-laid"):
        quant.in_token_pairs(tp)
