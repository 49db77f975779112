r"""Reference KV quantization: the specification every fast kernel must match.

Shape letters, fixed project-wide: ``B`` batch, ``H`` KV heads, ``T`` tokens, ``D`` head_dim,
``G`` group size.

Quantizer (asymmetric round-to-nearest min/max, KVTuner Eq. 2)::

    zero  = min(group)                              stored in the metadata dtype, rounded down
    scale = (max(group) - zero) / (2**b - 1)        stored in the metadata dtype, rounded up
    q     = clamp(round((x - zero) / scale), 0, 2**b - 1)     unsigned codes
    x_hat = q * scale + zero                        computed in fp32, returned in the dtype asked for

Statistics are taken in fp32 and the stored scale/zero are rounded *outward*, so every element
of a group lies inside the representable range and ``|x - x_hat| <= scale / 2`` holds (up to the
final rounding to the output dtype). A constant group has ``scale == 0`` and is reproduced exactly.

Metadata dtype (:func:`meta_dtype`): fp32 inputs keep fp32 scales/zeros; fp16 *and bf16* inputs
store them in fp16, which has 3 more mantissa bits than bf16 at the same 2 bytes, and is the dtype
the GPU decode kernel computes in (converting bf16 metadata there cost the 4-bit kernel 22 spilled
registers and ~10 % of its time on an H100). fp16's range ends at 65504: a group whose min or
``max - min`` lies beyond it (keys and values of real models stay far inside) has its zero/scale
saturated at +-65504, so its elements beyond that range are clamped. Pass ``meta=torch.bfloat16``
to :func:`quantize` to keep bf16's range instead.

Granularity:

* ``per_token``: groups of ``G`` consecutive channels inside one token of one head;
  ``scale``/``zero`` have shape ``[B, H, T, ceil(D / G)]``.
* ``per_channel`` (KIVI keys): groups of ``G`` consecutive tokens inside one channel;
  ``scale``/``zero`` have shape ``[B, H, ceil(T / G), D]``.

The last group along an axis may be shorter (a tail); its statistics cover only real elements.

Bit layout of the packed codes (``uint8``, packed along the last dim D). A width ``w`` in
{1, 2, 4, 8} packs ``k = 8 // w`` codes per byte, code ``i`` of a byte in bits ``[w*i, w*i + w)``,
little end first::

    w=1:  byte = c0 | c1 << 1 | ... | c7 << 7
    w=2:  byte = c0 | c1 << 2 | c2 << 4 | c3 << 6        [c3 c3 c2 c2 c1 c1 c0 c0]  (MSB..LSB)
    w=4:  byte = c0 | c1 << 4                            [c1 c1 c1 c1 c0 c0 c0 c0]
    w=8:  byte = c0

Widths that are not a power of two are stored as *bit planes*, widest plane first (``PLANES``):
3 bits = a 2-bit plane of the low bits followed by a 1-bit plane of the high bit; 6 bits = a 4-bit
plane (low) followed by a 2-bit plane (high). Code ``c = low | high << w_low``. The planes are
concatenated along the last dim, each padded to whole bytes, so a token of ``D`` channels takes
``sum(ceil(D / (8 // w)) for w in PLANES[b])`` bytes: exactly ``b * D / 8`` when ``D`` is a
multiple of 8 (3-bit codes really take 3 bits). Packed codes have shape ``[B, H, T, packed_width(D,
b)]`` whatever the granularity, so tokens can be appended along dim -2.

Token blocks (``QuantizedTensor.token_block > 0``, :func:`to_token_blocks`): the same bytes per
token row, but every block of ``token_block`` tokens holds its codes plane by plane as channel rows
packed along *tokens* (in :func:`block_order`, with a 32-bit-word interleave). The cache keeps KIVI
values of 2-4 bits this way on the GPU, where the fused kernel's ``p . v`` runs over tokens;
:func:`dequantize` reads both layouts.

Rotation (optional, ``QuantSpec.rotation``): the cache quantizes ``x @ H`` instead of ``x`` (its
full-precision residual window stays plain, so rotation is paid once per flush, not per step), where
``H`` is the orthonormal Sylvester Hadamard matrix of size D (:func:`hadamard`, symmetric, so
``H @ H = I``). Attention is unchanged when queries are rotated the same way (``q H . k H = q . k``)
and outputs over rotated values are rotated back; outlier channels are spread over all channels,
so low-bit codes lose less (QuaRot, SpinQuant).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from .spec import PLANE_WIDTHS as PLANES
from .spec import packed_width as _packed_width

GRANULARITIES = ("per_token", "per_channel")


@dataclass
class QuantizedTensor:
    """Packed codes plus per-group scale and zero of one ``[..., T, D]`` tensor."""

    codes: torch.Tensor  # uint8 [..., T, packed_width(D, bits)]
    scale: torch.Tensor  # metadata dtype (meta_dtype), shape in the module docstring
    zero: torch.Tensor
    bits: int
    granularity: str
    group_size: int
    head_dim: int
    token_block: int = 0  # 0: codes packed along D; n > 0: token-blocked layout (``to_token_blocks``)
    channel_words: bool = False  # codes packed along D in word order (``to_channel_words``)
    token_pairs: bool = False  # per-token rows (codes, scales, zeros) interleaved by token pairs (``to_token_pairs``)

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def map(self, fn) -> QuantizedTensor:
        """Apply ``fn`` to codes, scale and zero alike (batch indexing, device moves)."""
        return QuantizedTensor(fn(self.codes), fn(self.scale), fn(self.zero), self.bits, self.granularity,
                               self.group_size, self.head_dim, self.token_block, self.channel_words, self.token_pairs)


def _check_bits(bits: int) -> None:
    if bits not in PLANES:
        raise ValueError(f"bits={bits!r} is invalid; allowed: 2, 3, 4, 6 or 8")


def packed_width(dim: int, bits: int) -> int:
    """Bytes per token for ``dim`` codes of ``bits`` bits (all planes)."""
    _check_bits(bits)
    return _packed_width(dim, bits)


# ---------------------------------------------------------------------- packing
def _pack_plane(codes: torch.Tensor, w: int) -> torch.Tensor:
    per_byte = 8 // w
    if per_byte == 1:
        return codes.contiguous()
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte).to(torch.int32)
    shifts = torch.arange(0, 8, w, device=codes.device, dtype=torch.int32)
    return (codes << shifts).sum(-1).to(torch.uint8)


def _unpack_plane(packed: torch.Tensor, w: int, dim: int) -> torch.Tensor:
    if w == 8:
        return packed[..., :dim]
    shifts = torch.arange(0, 8, w, device=packed.device, dtype=torch.int32)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << w) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :dim].to(torch.uint8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8`` codes ``[..., D]`` (values < 2**bits) into ``[..., packed_width(D, bits)]`` bytes."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes.dtype={codes.dtype} is invalid; allowed: torch.uint8")
    planes = _pack_planes(codes, bits)
    return planes[0] if len(planes) == 1 else torch.cat(planes, dim=-1)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., packed_width(dim, bits)]`` bytes to ``[..., dim]`` ``uint8`` codes."""
    _check_bits(bits)
    return _unpack_planes(packed, bits, lambda w: -(-dim // (8 // w)), lambda b, w: _unpack_plane(b, w, dim))


def _pack_planes(codes: torch.Tensor, bits: int, arrange=None) -> list[torch.Tensor]:
    """Each bit plane of ``codes`` (``PLANES``, low bits first), ``arrange(plane, w)`` applied before packing."""
    planes, shift = [], 0
    for w in PLANES[bits]:
        plane = (codes >> shift) & ((1 << w) - 1)
        planes.append(_pack_plane(plane if arrange is None else arrange(plane, w), w))
        shift += w
    return planes


def _unpack_planes(packed: torch.Tensor, bits: int, width, read) -> torch.Tensor:
    """Codes from bit planes concatenated along the last dim: plane ``w`` takes ``width(w)`` bytes,
    ``read(bytes, w)`` turns them into that plane's codes."""
    out, shift, col = None, 0, 0
    for w in PLANES[bits]:
        part = read(packed[..., col:col + width(w)], w)
        out = part if out is None else out | (part << shift)
        shift, col = shift + w, col + width(w)
    return out


@functools.lru_cache(maxsize=64)  # once per (block, device): the cache re-lays values at every flush
def block_order(block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The token stored at each position of a token block (:func:`to_token_blocks`): position
    ``4 S c + 4 s + 2 h + i`` (``S = block / 16`` slabs of 16 tokens) holds token ``16 s + 8 h + 2 c + i``.

    Why: an MMA lane group ``c`` (``c < 4``) needs tokens ``2c, 2c+1, 2c+8, 2c+9`` of every 16-token
    slab; in this order they are one contiguous run of bytes per channel row."""
    c, s, h, i = torch.meshgrid(torch.arange(4), torch.arange(block // 16), torch.arange(2), torch.arange(2),
                                indexing="ij")
    return (16 * s + 8 * h + 2 * c + i).flatten().to(device)  # read only: shared between calls


def _to_words(x: torch.Tensor, w: int) -> torch.Tensor:
    """Elements in position order -> the order :func:`_pack_plane` packs them in, so that code ``f``
    of byte ``k`` of each 32-bit word holds element ``4 f + k`` of that word."""
    per = 8 // w
    if per == 1:
        return x
    return x.reshape(*x.shape[:-1], -1, per, 4).transpose(-1, -2).flatten(-3)


def _from_words(x: torch.Tensor, w: int) -> torch.Tensor:
    per = 8 // w
    if per == 1:
        return x
    return x.reshape(*x.shape[:-1], -1, 4, per).transpose(-1, -2).flatten(-3)


def _to_pairs(x: torch.Tensor, w: int) -> torch.Tensor:
    """Elements in position order -> the order :func:`_pack_plane` packs the planes of a 3-bit code in
    inside a token block: in every 16 elements ``e = 8 u + 2 f + k``, the 2-bit plane keeps element
    ``e`` as code ``f`` of byte ``2 u + k``, and the 1-bit plane keeps it as bit ``2 f + 1 - u`` of
    byte ``k``."""
    if w == 2:
        return x.reshape(*x.shape[:-1], -1, 4, 2).transpose(-1, -2).flatten(-3)
    y = x.reshape(*x.shape[:-1], -1, 2, 4, 2).flip(-3)  # [..., 16-element group, 1 - u, f, k]
    n = y.dim()
    return y.permute(*range(n - 3), n - 1, n - 2, n - 3).flatten(-4)


def _from_pairs(x: torch.Tensor, w: int) -> torch.Tensor:
    if w == 2:
        return x.reshape(*x.shape[:-1], -1, 2, 4).transpose(-1, -2).flatten(-3)
    y = x.reshape(*x.shape[:-1], -1, 2, 4, 2)  # [..., group, k, f, 1 - u]
    n = y.dim()
    return y.permute(*range(n - 3), n - 1, n - 2, n - 3).flip(-3).flatten(-4)


def _block_arrangement(bits: int):
    """How the planes of ``bits``-bit codes are ordered inside a token block (to, from)."""
    return (_to_pairs, _from_pairs) if PLANES[bits] == (2, 1) else (_to_words, _from_words)


def to_token_blocks(packed: torch.Tensor, bits: int, dim: int, block: int) -> torch.Tensor:
    """Re-lay channel-packed codes ``[..., T, packed_width(dim, bits)]`` (``T`` a multiple of
    ``block``) in token blocks, the layout of token-blocked values in the cache. Same shape and
    bytes as the input, so memory and appends (whole blocks) are unchanged.

    The bytes of ``block`` consecutive tokens hold, plane by plane (widest first, as in :func:`pack`),
    ``dim`` channel rows of ``block * w / 8`` bytes: that channel's codes of the block's tokens in
    :func:`block_order`, packed so that code ``f`` of byte ``k`` of every 32-bit word holds element
    ``4 f + k`` of the word (the PTX unpackers turn code ``f`` of 2 adjacent bytes into one fp16x2
    register, which then holds 2 adjacent tokens). 3-bit codes (a 2-bit and a 1-bit plane) use pair
    order instead (:func:`_to_pairs`): in every 16 elements ``e = 8 u + 2 f + k``, code ``f`` of byte
    ``2 u + k`` of the 2-bit plane and bit ``2 f + 1 - u`` of byte ``k`` of the 1-bit plane, so that
    one PTX call joins both planes with one shift per 8 elements (no second unpacked tile to add).

    Why: a decode kernel computes ``p . v`` over tokens. Codes packed along the dot's depth unpack
    straight into the matrix-multiply operand's registers, as keys (packed along D, the depth of
    ``q . k``) do; values packed along D were unpacked, written to shared memory and read back
    transposed.
    """
    _check_layout(packed, bits, dim, block)
    codes = unpack(packed, bits, dim)  # [..., T, D]
    lead, t = codes.shape[:-2], codes.shape[-2]
    blocks = codes.reshape(*lead, t // block, block, dim).transpose(-1, -2)  # [..., T/block, D, block]
    blocks = blocks[..., block_order(block, codes.device)]
    planes = _pack_planes(blocks, bits, _block_arrangement(bits)[0])
    return torch.cat([plane.flatten(-2) for plane in planes], dim=-1).reshape(packed.shape)


def from_token_blocks(blocked: torch.Tensor, bits: int, dim: int, block: int) -> torch.Tensor:
    """Inverse of :func:`to_token_blocks`: channel-packed codes ``[..., T, packed_width(dim, bits)]``."""
    _check_layout(blocked, bits, dim, block)
    lead, t = blocked.shape[:-2], blocked.shape[-2]
    flat = blocked.reshape(*lead, t // block, -1)
    from_order = _block_arrangement(bits)[1]
    codes = _unpack_planes(flat, bits, lambda w: dim * block * w // 8,
                           lambda b, w: from_order(_unpack_plane(b.reshape(*lead, t // block, dim, -1), w, block), w))
    tokens = torch.empty_like(codes)
    tokens[..., block_order(block, codes.device)] = codes
    return pack(tokens.transpose(-1, -2).reshape(*lead, t, dim).contiguous(), bits)


def to_channel_words(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Re-lay codes packed along D (:func:`pack`) in word order: in every 32-bit word of a plane,
    code ``f`` of byte ``k`` holds channel ``4 f + k`` of the word's channels (as inside a token
    block, :func:`to_token_blocks`). Same shape and bytes.

    Why: the PTX unpackers return code ``f`` of two adjacent bytes in one fp16x2 register; in this
    order that register holds two adjacent channels, as the key MMA operand wants them, instead of
    channels ``2j`` and ``2j + 2`` that the kernel must repack (``PRMT``).

    3-bit codes in word order are *contiguous* instead: the 8 codes of channels ``8 u .. 8 u + 7``
    form one 24-bit word ``sum_k c_k << 3 k``, whose low 16 bits take the 2 bytes that the 2-bit
    plane gives those channels (little end first) and whose high 8 bits take the 1-bit plane's byte.
    The same bytes, but every code lies whole in one 16-bit window of its word, so the kernel
    unpacks it with one mask and one packed FMA per 2 codes, not two planes' four
    (``kernels.ptx.asm3_contiguous``).
    """
    _check_words(bits, dim)
    if PLANES[bits] == (2, 1):
        codes = unpack(packed, bits, dim).to(torch.int32).reshape(*packed.shape[:-1], dim // 8, 8)
        word = (codes << torch.arange(0, 24, 3, dtype=torch.int32, device=codes.device)).sum(-1)
        lo = torch.stack([word & 0xFF, (word >> 8) & 0xFF], dim=-1).flatten(-2)
        return torch.cat([lo, word >> 16], dim=-1).to(torch.uint8)
    return torch.cat(_pack_planes(unpack(packed, bits, dim), bits, _to_words), dim=-1)


def from_channel_words(worded: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`to_channel_words`."""
    _check_words(bits, dim)
    if PLANES[bits] == (2, 1):
        b = worded.to(torch.int32)
        word = b[..., 0:dim // 4:2] | b[..., 1:dim // 4:2] << 8 | b[..., dim // 4:] << 16
        codes = (word[..., None] >> torch.arange(0, 24, 3, dtype=torch.int32, device=b.device)) & 7
        return pack(codes.flatten(-2).to(torch.uint8), bits)
    codes = _unpack_planes(worded, bits, lambda w: dim * w // 8, lambda b, w: _from_words(_unpack_plane(b, w, dim), w))
    return pack(codes.contiguous(), bits)


def to_token_pairs(rows: torch.Tensor) -> torch.Tensor:
    """Per-token rows ``[..., T, C]`` (codes, scales or zeros) interleaved by token pairs: the element of token
    ``2p + x`` at column ``c`` goes to position ``2c + x`` of the pair's ``2C`` elements (rows ``2p`` and
    ``2p + 1``). Same shape and bytes.

    Why: the decode kernel's ``V^T P^T`` product runs over tokens, and its PTX unpackers return code ``f`` of
    two adjacent bytes in one fp16x2 register; in this order those bytes belong to one channel of two adjacent
    tokens, the pair that MMA operand wants, so values need no register repacking (``kernels.gluon_decode``).
    """
    *lead, t, c = rows.shape
    if t % 2:
        raise ValueError(f"{t} tokens are not whole token pairs; allowed: an even count")
    return rows.reshape(*lead, t // 2, 2, c).transpose(-1, -2).reshape(*lead, t, c).contiguous()


def from_token_pairs(rows: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_token_pairs`."""
    *lead, t, c = rows.shape
    return rows.reshape(*lead, t // 2, c, 2).transpose(-1, -2).reshape(*lead, t, c).contiguous()


def in_token_pairs(qt: QuantizedTensor) -> QuantizedTensor:
    """Per-token ``qt`` (codes packed along D) with codes, scales and zeros in token pairs (:func:`to_token_pairs`)."""
    _check_plain(qt)
    if qt.granularity != "per_token":
        raise ValueError("token pairs lay out per-token rows; allowed: granularity 'per_token'")
    return dataclasses.replace(qt.map(to_token_pairs), token_pairs=True)


def in_token_blocks(qt: QuantizedTensor, block: int) -> QuantizedTensor:
    """``qt`` (codes packed along D) with its codes in token blocks of ``block`` (:func:`to_token_blocks`)."""
    _check_plain(qt)
    return dataclasses.replace(qt, codes=to_token_blocks(qt.codes, qt.bits, qt.head_dim, block), token_block=block)


def in_channel_words(qt: QuantizedTensor) -> QuantizedTensor:
    """``qt`` (codes packed along D) with its codes in channel word order (:func:`to_channel_words`)."""
    _check_plain(qt)
    return dataclasses.replace(qt, codes=to_channel_words(qt.codes, qt.bits, qt.head_dim), channel_words=True)


def _check_plain(qt: QuantizedTensor) -> None:
    if qt.token_block or qt.channel_words or qt.token_pairs:
        raise ValueError("codes already re-laid (token_block, channel_words or token_pairs); allowed: codes packed "
                         "along D")


def word_channels(bits: int) -> int:
    """Channels per word in word order (:func:`to_channel_words`); head_dim must be a multiple of it:
    the 8 channels of a contiguous 24-bit word for 3 bits, else a 32-bit word of the narrowest plane."""
    _check_bits(bits)
    return 8 if PLANES[bits] == (2, 1) else max(32 // w for w in PLANES[bits])


def _check_words(bits: int, dim: int) -> None:
    need = word_channels(bits)
    if dim % need:
        raise ValueError(f"head_dim {dim} is invalid for {bits}-bit codes in word order; allowed: a multiple of {need}")


def _check_layout(packed: torch.Tensor, bits: int, dim: int, block: int) -> None:
    _check_bits(bits)
    if block < 32 or block % 32 or dim % 8:
        raise ValueError(f"token blocks of {block} tokens over head_dim {dim} are invalid; allowed: a block that "
                         "is a multiple of 32 tokens (whole 32-bit words per plane) and head_dim a multiple of 8")
    if packed.shape[-2] % block:
        raise ValueError(f"{packed.shape[-2]} tokens are not a multiple of the token block {block}")


# ---------------------------------------------------------------------- rotation
_HADAMARD: dict[tuple, torch.Tensor] = {}


def hadamard(dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
             normalized: bool = True) -> torch.Tensor:
    """The Sylvester Hadamard matrix ``[dim, dim]`` (``dim`` a power of two), orthonormal (entries
    ``±1/sqrt(dim)``) or, with ``normalized=False``, of ``±1`` entries (exact in every float dtype)."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"head_dim={dim} is invalid for rotation; allowed: a power of two")
    key = (dim, torch.device(device), dtype, normalized)
    if key not in _HADAMARD:
        h = torch.ones(1, 1)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = (h / dim ** 0.5 if normalized else h).to(key[1], dtype)
    return _HADAMARD[key]


ROTATE_CHUNK = 1 << 24  # elements rotated per fp32 matmul (64 MiB per fp32 temporary)


def rotate(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ H`` over the last dim, computed in fp32, returned in ``dtype`` (default ``x.dtype``).
    ``H`` is its own inverse, so the same call rotates back.

    Large inputs go through in chunks of rows (``ROTATE_CHUNK`` elements): the fp32 copy and product
    of a whole prefill (e.g. 230 sequences x 4,096 tokens of one layer) needed 8 bytes per element on
    top of the input and output, which ran a benchmark's cache write out of GPU memory."""
    d = x.shape[-1]
    h = hadamard(d, x.device)  # raises unless d is a power of two (so d >= 1)
    out_dtype = dtype or x.dtype
    rows = x.numel() // d
    step = max(1, ROTATE_CHUNK // d)
    if rows <= step:
        return (x.float() @ h).to(out_dtype)
    flat = x.reshape(rows, d)
    out = torch.empty(rows, d, dtype=out_dtype, device=x.device)
    for i in range(0, rows, step):
        out[i:i + step] = flat[i:i + step].float() @ h
    return out.view(x.shape)


# ---------------------------------------------------------------------- grouping helpers
def _groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """View the last dim of ``x`` as ``[n, g]`` groups; a short tail is padded with its last element."""
    n = x.shape[-1]
    pad = (-n) % g
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, g)


def _round_outward(v: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """Cast fp32 ``v`` to ``dtype`` so that the result is <= v (down) or >= v (up)."""
    r = v.to(dtype)
    if dtype == torch.float32:
        return r
    info = torch.finfo(dtype)
    step = torch.clamp(v.abs() * info.eps, min=info.tiny)
    rf = r.float()
    if down:
        return torch.where(rf > v, (v - step).to(dtype), r)
    return torch.where(rf < v, (v + step).to(dtype), r)


META_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def meta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The default dtype of the stored scales/zeros for inputs of ``dtype`` (module docstring)."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def _saturate(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clamp a stored 16-bit parameter to its dtype's finite range (outward rounding can pass it)."""
    big = torch.finfo(dtype).max
    return v.clamp(-big, big) if dtype != torch.float32 else v


def _qparams_last(x32: torch.Tensor, bits: int, g: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    grouped = _groups(x32, g)
    mn, mx = grouped.amin(-1), grouped.amax(-1)
    zero = _saturate(_round_outward(mn, dtype, down=True), dtype)
    # a tensor divisor: with a Python scalar, CUDA torch multiplies by its reciprocal (not IEEE division),
    # and the stored scale would then depend on the device
    levels = torch.full_like(mx, 2**bits - 1)
    scale = _saturate(_round_outward((mx - zero.float()) / levels, dtype, down=False), dtype)
    return scale, zero


def _expand(p: torch.Tensor, g: int, n: int) -> torch.Tensor:
    return p.float().repeat_interleave(g, dim=-1)[..., :n]


# ---------------------------------------------------------------------- quantize / dequantize
def quantize(x: torch.Tensor, bits: int, granularity: str = "per_token", group_size: int | None = None,
             meta: torch.dtype | None = None) -> QuantizedTensor:
    """Quantize ``x`` ``[..., T, D]`` (fp32, fp16 or bf16) to packed codes.

    Args:
        x: tensor with tokens on dim -2 and channels on dim -1.
        bits: 2, 3, 4, 6 or 8.
        granularity: ``"per_token"`` (groups along D) or ``"per_channel"`` (groups along T).
        group_size: elements per group; ``None`` means the whole axis (D for per_token, T for
            per_channel).
        meta: dtype of the stored scale/zero; ``None``: :func:`meta_dtype` of ``x.dtype``.

    Returns:
        :class:`QuantizedTensor` whose scale/zero have the metadata dtype.
    """
    _check_bits(bits)
    meta = check_meta(meta, x.dtype)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is invalid; allowed: 'per_token' or 'per_channel'")
    if not x.is_floating_point():
        raise TypeError(f"x.dtype={x.dtype} is invalid; allowed: a floating-point dtype")
    if x.dim() < 2:
        raise ValueError(f"x.dim()={x.dim()} is invalid; allowed: >= 2 ([..., T, D])")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size={group_size!r} is invalid; allowed: a positive integer or None")
    t, d = x.shape[-2], x.shape[-1]
    x32 = x.float()
    if granularity == "per_channel":
        x32 = x32.transpose(-1, -2)  # [..., D, T]: groups run along tokens
    n = x32.shape[-1]
    g = max(n, 1) if group_size is None else group_size
    if t == 0:
        empty = x.new_zeros(*x.shape[:-2], 0, d, dtype=meta)
        codes = torch.zeros(*x.shape[:-2], 0, packed_width(d, bits), dtype=torch.uint8, device=x.device)
        return QuantizedTensor(codes, empty[..., :0], empty[..., :0], bits, granularity, g, d)
    scale, zero = _qparams_last(x32, bits, g, meta)
    s, z = _expand(scale, g, n), _expand(zero, g, n)
    q = torch.where(s > 0, torch.round((x32 - z) / torch.where(s > 0, s, 1.0)), 0.0)
    q = q.clamp_(0, 2**bits - 1).to(torch.uint8)
    if granularity == "per_channel":
        q, scale, zero = q.transpose(-1, -2), scale.transpose(-1, -2), zero.transpose(-1, -2)
    return QuantizedTensor(pack(q.contiguous(), bits), scale.contiguous(), zero.contiguous(), bits, granularity,
                           g, d)


def check_meta(meta: torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """The metadata dtype to use for inputs of ``dtype`` (``None``: the default), or a clear error."""
    if meta is None:
        return meta_dtype(dtype)
    if meta not in META_DTYPES:
        raise ValueError(f"meta={meta} is invalid; allowed: torch.float16, torch.bfloat16 or torch.float32")
    return meta


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reconstruct ``[..., T, D]`` from a :class:`QuantizedTensor` (math in fp32), in ``dtype``
    (default: the metadata dtype)."""
    dtype = dtype or qt.scale.dtype
    if qt.token_pairs:
        qt = dataclasses.replace(qt.map(from_token_pairs), token_pairs=False)
    codes = qt.codes
    if qt.token_block:
        codes = from_token_blocks(codes, qt.bits, qt.head_dim, qt.token_block)
    elif qt.channel_words:
        codes = from_channel_words(codes, qt.bits, qt.head_dim)
    q = unpack(codes, qt.bits, qt.head_dim).float()
    scale, zero = element_params(qt)
    return (q * scale + zero).to(dtype)


def element_params(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero of every element, each ``[..., T, D]`` fp32 (what :func:`dequantize` applies)."""
    if qt.granularity == "per_channel":
        t = qt.num_tokens
        return tuple(_expand(p.transpose(-1, -2), qt.group_size, t).transpose(-1, -2) for p in (qt.scale, qt.zero))
    return tuple(_expand(p, qt.group_size, qt.head_dim) for p in (qt.scale, qt.zero))


def fake_quantize(x: torch.Tensor, bits: int, granularity: str = "per_token", group_size: int | None = None
                  ) -> torch.Tensor:
    """``dequantize(quantize(x))``: simulated quantization in ``x.dtype``; 16 bits returns ``x``."""
    if bits >= 16:
        return x
    return dequantize(quantize(x, bits, granularity, group_size), x.dtype)  # default metadata, as the cache


def cat(parts: list[QuantizedTensor], dim: int = -2) -> QuantizedTensor:
    """Concatenate quantized blocks along tokens (``dim=-2``; per_channel blocks must hold whole
    groups) or along the batch (``dim=0``)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    layout = lambda p: (p.token_block, p.channel_words, p.token_pairs)  # noqa: E731
    if any(layout(p) != layout(first) for p in parts):
        raise ValueError("blocks in different layouts (token_block, channel_words, token_pairs) cannot be concatenated")
    return QuantizedTensor(torch.cat([p.codes for p in parts], dim=dim), torch.cat([p.scale for p in parts], dim=dim),
                           torch.cat([p.zero for p in parts], dim=dim), first.bits, first.granularity,
                           first.group_size, first.head_dim, first.token_block, first.channel_words, first.token_pairs)


def materialize(packed: QuantizedTensor | None, residual: torch.Tensor | None, dtype: torch.dtype,
                rotated: bool = False) -> torch.Tensor:
    """The dequantized history followed by the full-precision residual, in ``dtype`` (either part may
    be ``None`` or empty, not both). ``rotated``: the history holds ``x @ H`` and is rotated back (in
    fp32) to the residual's plain basis."""
    parts = []
    if packed is not None and packed.num_tokens:
        parts.append(rotate(dequantize(packed, torch.float32), dtype) if rotated else dequantize(packed, dtype))
    if residual is not None and residual.shape[-2]:
        parts.append(residual.to(dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def length_unit(qt: QuantizedTensor) -> int:
    """Tokens per count of a static buffer's quantized length (``decode_attention(lengths=)``): the
    key group for per-channel (KIVI) keys, whose flushes are whole groups, else 1."""
    return qt.group_size if qt.granularity == "per_channel" else 1


def slice_tokens(qt: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    """Tokens ``[start, stop)``; for per_channel both ends must fall on group boundaries, for
    token-blocked codes on block boundaries."""
    if qt.granularity == "per_channel":
        g = qt.group_size
        if start % g or (stop % g and stop != qt.num_tokens):
            raise ValueError(f"per_channel slice [{start}, {stop}) is invalid; allowed: multiples of group_size={g}")
        gs, ge = start // g, -(-stop // g)
        return QuantizedTensor(qt.codes[..., start:stop, :], qt.scale[..., gs:ge, :], qt.zero[..., gs:ge, :],
                               qt.bits, qt.granularity, g, qt.head_dim, qt.token_block, qt.channel_words)
    if qt.token_pairs and (start % 2 or stop % 2):
        raise ValueError(f"slice [{start}, {stop}) of token-paired rows is invalid; allowed: even ends")
    if qt.token_block and (start % qt.token_block or stop % qt.token_block):
        raise ValueError(f"slice [{start}, {stop}) of token-blocked codes is invalid; allowed: multiples of the "
                         f"token block {qt.token_block}")
    return qt.map(lambda t: t[..., start:stop, :])
