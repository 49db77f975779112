"""Which implementation runs a cache's hot spots, and how its packed codes are laid out.

A :class:`KernelPolicy` is handed to :class:`kvtuner.MixedPrecisionCache` (and to the profiler, whose
simulated cache follows the same rules). Every choice defaults to ``"auto"``: the Triton kernels for
tensors on a CUDA device, the PyTorch reference otherwise, and on the kernel path the storage layouts
measured faster there (``docs/kernels.md`` gives the measurements). Forcing a choice is for tests and
A/B benchmarks; the bytes held are the same in every layout.

Each cache layer asks :meth:`KernelPolicy.layout` once, when it first sees its device, and keeps the
answer (a :class:`LayerLayout`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Literal

import torch

from . import quant
from .spec import QuantSpec

BACKENDS = ("auto", "torch", "triton")
SWITCHES = ("auto", "on", "off")
DECODERS = ("auto", "triton", "gluon")
Switch = Literal["auto", "on", "off"]

TOKEN_BLOCK_BITS = (2, 3, 4)
FAST_TOKEN_BLOCKS = (128,)  # flush units at which the fused kernel reads token-blocked values faster


@functools.cache
def gluon_runs_on(device_index: int) -> bool:
    """Whether the Gluon decode kernel runs on this CUDA device: Triton with Gluon, and an sm_80+ GPU
    (``mma.sync`` and ``movmatrix``)."""
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class LayerLayout:
    """How one layer stores its codes, decided once per layer.

    Attributes:
        triton: quantize with the Triton kernels and let decode read packed storage with the fused kernel.
        key_words: keys in channel word order (``quant.in_channel_words``).
        value_words: values in channel word order (3-bit values packed along head_dim).
        value_block: tokens per value block (``quant.in_token_blocks``); 0: values packed along head_dim.
        value_pairs: values (codes, scales, zeros) in token pairs (``quant.in_token_pairs``).
        gluon: decode with the Gluon kernel (``kernels.gluon_decode``), which reads keys in channel word order
            and values in token pairs.
    """

    triton: bool = False
    key_words: bool = False
    value_words: bool = False
    value_block: int = 0
    value_pairs: bool = False
    gluon: bool = False


@dataclass(frozen=True)
class KernelPolicy:
    """Backend and storage layouts of a cache.

    Args:
        backend: ``"auto"`` (Triton for CUDA tensors when Triton imports, else the reference),
            ``"torch"`` (the reference everywhere) or ``"triton"`` (the kernels for CUDA tensors; CPU
            tensors take them only under Triton's interpreter, ``TRITON_INTERPRET=1``, which is how the
            kernels are tested without a GPU).
        value_token_blocks: KIVI values of 2-4 bits stored in blocks of one flush unit of tokens.
            ``"auto"``: on the kernel path for 128-token units.
        words3: 3-bit codes as contiguous 24-bit words per 8 channels (keys, and values not in token
            blocks). ``"auto"``: on the kernel path.
        decode: the decode-attention kernel of layers it covers: ``"triton"`` (``kernels.decode_attention``
            everywhere), ``"gluon"`` (``kernels.gluon_decode``: KIVI G = 32, head_dim 128, 2/4/8-bit keys,
            2/3/4/8-bit values; other layers keep the Triton kernel) or ``"auto"`` (Gluon on sm_80+ GPUs where
            Triton has it). The Gluon kernel is faster per layer (``docs/kernels.md``); it becomes the default
            once its CUDA-graph decoding is verified and measured end to end on a GPU.
        decode_stages: tiles the Gluon kernel copies ahead through a ring in shared memory (``cp.async``);
            0 loads them straight into registers.
    """

    backend: str = "auto"
    value_token_blocks: Switch = "auto"
    words3: Switch = "auto"
    decode: str = "triton"
    decode_stages: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is invalid; allowed: {', '.join(BACKENDS)}")
        for name in ("value_token_blocks", "words3"):
            if getattr(self, name) not in SWITCHES:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {', '.join(SWITCHES)}")
        if self.decode not in DECODERS:
            raise ValueError(f"decode={self.decode!r} is invalid; allowed: {', '.join(DECODERS)}")
        if self.decode_stages not in (0, 2, 3, 4):
            raise ValueError(f"decode_stages={self.decode_stages!r} is invalid; allowed: 0, 2, 3 or 4")
        if self.backend == "triton" and not triton_available():
            raise ImportError("backend='triton' needs Triton; install it with: pip install 'kvtuner[gpu]'")

    def use_triton(self, device: torch.device | str) -> bool:
        """Whether tensors on ``device`` go through the Triton kernels."""
        if self.backend == "torch" or not triton_available():
            return False
        if getattr(device, "type", str(device)) == "cuda":
            return True
        return self.backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"

    def _gluon(self, device: torch.device | str) -> bool:
        if self.decode != "auto":
            return self.decode == "gluon"
        device = torch.device(device)
        return device.type == "cuda" and torch.cuda.is_available() and gluon_runs_on(
            device.index if device.index is not None else torch.cuda.current_device())

    def value_block(self, spec: QuantSpec, head_dim: int, triton: bool) -> int:
        """Tokens per value block (0: values packed along head_dim)."""
        unit = spec.flush_unit("value")
        possible = (spec.mode == "kivi" and spec.bits in TOKEN_BLOCK_BITS and unit % 32 == 0 and head_dim % 8 == 0)
        wanted = _switch(self.value_token_blocks, unit in FAST_TOKEN_BLOCKS and triton)
        return unit if possible and wanted else 0

    def layout(self, key: QuantSpec, value: QuantSpec, head_dim: int, device: torch.device | str) -> LayerLayout:
        """The layout of one layer whose keys and values follow ``key`` and ``value`` on ``device``."""
        triton = self.use_triton(device)
        if triton and self._gluon(device) and _gluon_covers(key, value, head_dim):
            return LayerLayout(triton=True, key_words=True, value_pairs=True, gluon=True)
        block = self.value_block(value, head_dim, triton)
        words3 = _switch(self.words3, triton)
        return LayerLayout(triton=triton, key_words=_key_words(key, head_dim, block, words3),
                           value_words=value.bits == 3 and not block and words3 and _fits_words(value, head_dim),
                           value_block=block)


def _gluon_covers(key: QuantSpec, value: QuantSpec, head_dim: int) -> bool:
    """Layers the Gluon decode kernel reads: KIVI, 32-token key groups and 32-channel value groups, 2-, 4- or
    8-bit keys, 2-, 3-, 4- or 8-bit values, head_dim 128 (rotated or not, with or without sink tokens)."""
    return (head_dim == 128 and key.mode == value.mode == "kivi" and key.bits in (2, 4, 8)
            and value.bits in (2, 3, 4, 8) and key.group_size == value.group_size == 32
            and value.channel_group(head_dim) == 32)


def _switch(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "on"


def _fits_words(spec: QuantSpec, head_dim: int) -> bool:
    return spec.bits in (3, 4) and head_dim % quant.word_channels(spec.bits) == 0


def _key_words(spec: QuantSpec, head_dim: int, value_block: int, words3: bool) -> bool:
    """Keys in channel word order: 3-bit keys as contiguous words (``words3``); 4-bit keys beside
    token-blocked values (the kernel then skips the fp16-pair repacking of the key tile)."""
    if not _fits_words(spec, head_dim):
        return False
    return words3 if spec.bits == 3 else value_block > 0


DEFAULT_POLICY = KernelPolicy()
