"""Launch configuration of the decode kernel: tile size, warps, stages, register cap, split count.

Defaults come from rules, then from a measured table per GPU model (``tables/<gpu>.json``: numbers
only, with the command that regenerates them). ``docs/kernels.md`` gives the measurement behind each
rule and table entry.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

TABLES = Path(__file__).with_name("tables")
DEFAULT_TABLE = "h100"  # GPUs without a table of their own take the H100's
LAYOUTS = ("", "tokens", "groups")
LAUNCH_KEYS = ("num_warps", "num_stages", "swap_qk", "swap_pv", "asm", "fold_k", "fold_v", "maxnreg", "splits_per_sm",
               "unpack3_k", "unpack3_v", "dq16")
_SMALL = ("splits_per_sm", "maxnreg", "num_stages")  # each may have a "<name>_small" entry for few long rows
FOLDS = {"reg": 0, "norm": 1, "plain": 2}  # how a scale/zero reaches the dot (kernel constexpr FOLD_K/FOLD_V)
# how 3-bit codes are unpacked with PTX (kernel constexpr UNPACK3_K/UNPACK3_V): plane by plane, both
# planes per 8-channel word (head_dim % 16 == 0), or per 4-channel byte + nibble (head_dim % 8 == 0)
UNPACK3 = {"planes": 0, "words": 1, "nibbles": 2}


@dataclass(frozen=True)
class Target:
    """What a launch is configured for: SM count, whether inline PTX runs, and the launch table's name."""

    sms: int
    ptx: bool
    table: str = DEFAULT_TABLE

    @staticmethod
    def of(device: torch.device) -> Target:
        if device.type != "cuda":  # Triton's interpreter: no PTX, a nominal SM count
            return Target(8, False)
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(props.multi_processor_count, os.environ.get("TRITON_INTERPRET") != "1", table_name(props.name))


def table_name(gpu_name: str) -> str:
    """The launch table for a GPU named ``gpu_name`` (``torch.cuda.get_device_name``)."""
    name = gpu_name.lower()
    for table in sorted(p.stem for p in TABLES.glob("*.json")):
        if table in name:
            return table
    return DEFAULT_TABLE


@functools.cache
def launch_table(name: str = DEFAULT_TABLE) -> dict[tuple[int, int, str], dict]:
    """Measured launch choices per (k_bits, v_bits, layout) at D = 128, from ``tables/<name>.json``
    (keys ``"k,v"`` for 128-token tiles of one key group, ``"k,v,tokens"`` for token-blocked values,
    ``"k,v,groups"`` for key groups shorter than the tile, e.g. KIVI G = 32)."""
    path = TABLES / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"launch table {name!r} not found; allowed: "
                                f"{', '.join(sorted(p.stem for p in TABLES.glob('*.json')))}")
    out = {}
    for key, entry in json.loads(path.read_text())["pairs"].items():
        k, v, *layout = key.split(",")
        kind = ",".join(layout)
        if kind not in LAYOUTS:
            raise ValueError(f"launch table key {key!r} is invalid; allowed: 'k,v', 'k,v,tokens' or 'k,v,groups'")
        out[int(k), int(v), kind] = entry
    return out


def default_block_n(kbits: int, vbits: int, block_d: int, key_group: int | None, value_block: int = 0,
                    table: str = DEFAULT_TABLE) -> int:
    """Tokens per tile when the caller gives none. ``key_group``: tokens per key group (per-channel
    keys), ``None`` for per-token keys; ``value_block``: the values' token block (0: none).

    Token-blocked values: one block per tile. Key groups shorter than 128 tokens that divide it (KIVI
    G = 32) at head_dim <= 128: 128-token tiles over several groups (the ``"groups"`` entry's
    ``block_n``; without one, 64 for 8-bit keys, whose 128-token tile spills, else 128). Otherwise one
    key group per tile (at least 32 tokens), or 64.
    """
    if value_block:
        return value_block
    if key_group is not None and key_group < 128 and 128 % key_group == 0 and block_d <= 128:
        entry = launch_table(table).get((kbits, vbits, "groups"), {})
        return entry.get("block_n", 64 if kbits == 8 else 128)
    return key_group if key_group is not None and key_group >= 32 else 64


def launch_defaults(kbits: int, vbits: int, block_d: int, block_n: int, target: Target, *,
                    table: bool = True, layout: str = "") -> dict:
    """Launch choices per bit pair: the rules, then the target's table entry.

    Rules: ``acc^T = V^T P^T`` (``swap_pv``) for 2- and 4-bit values and token-blocked values, never
    ``S^T = K q^T`` (``swap_qk``); packed PTX unpacking (``asm``) where it runs; 4 warps, 3 stages;
    3-bit keys unpacked by 8-channel word; key scales folded into q (``plain``) below 8 bits and
    applied in registers (``reg``) at 8; value scales in registers below 8 bits.

    The table entry (measured at D = 128 on its tile) overrides every choice for that tile shape and
    the fold choices for any shape. Its ``*_small`` fields replace ``splits_per_sm``, ``maxnreg`` and
    ``num_stages`` when there are fewer (batch x KV head) rows than SMs. ``layout`` (one of
    :data:`LAYOUTS`) picks the ``"tokens"`` or ``"groups"`` entry, falling back to the pair's.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid; allowed: {LAYOUTS}")
    return dict(_launch_defaults(kbits, vbits, block_d, block_n, target.ptx, target.table if table else "",
                                 layout))


@functools.lru_cache(maxsize=512)  # on the decode path once per layer and step: build each dict once
def _launch_defaults(kbits: int, vbits: int, block_d: int, block_n: int, ptx: bool, table: str,
                     layout: str = "") -> dict:
    out = dict(num_warps=4, num_stages=3 if block_d * block_n <= 128 * 128 else 2,
               swap_qk=False, swap_pv=vbits in (2, 4) or layout == "tokens", asm=ptx,
               fold_k="reg" if kbits == 8 else "plain", fold_v="norm" if vbits == 8 else "reg",
               maxnreg=None, splits_per_sm=4, splits_per_sm_small=None, maxnreg_small=None, num_stages_small=None,
               unpack3_k="words" if ptx else "planes", unpack3_v="planes", dq16=True)
    entries = launch_table(table) if table else {}
    entry = entries.get((kbits, vbits, layout)) or entries.get((kbits, vbits, ""))
    if entry:
        same_tile = block_d == 128 and block_n == entry.get("block_n", 128)
        out.update({k: v for k, v in entry.items() if k in out and (same_tile or k in ("fold_k", "fold_v"))})
        if not ptx:  # PTX unpacking and register caps only exist on the GPU
            out.update(asm=False, maxnreg=None, maxnreg_small=None, unpack3_k="planes", unpack3_v="planes")
    return out


@functools.lru_cache(maxsize=1024)  # once per layer and step: decide and validate once per configuration
def launch_choices(kbits: int, vbits: int, block_d: int, block_n: int, target: Target, small: bool,
                   given: tuple, layout: str = "") -> tuple:
    """The launch choices in ``LAUNCH_KEYS`` order: the defaults, with the split for few long rows when
    ``small``, overridden by the non-``None`` values of ``given`` (in ``LAUNCH_KEYS`` order)."""
    launch = dict(_launch_defaults(kbits, vbits, block_d, block_n, target.ptx, target.table, layout))
    if small:  # few long rows: their own measured split, register cap and stages
        for name in _SMALL:
            launch[name] = launch[name + "_small"] or launch[name]
    launch.update({k: v for k, v in zip(LAUNCH_KEYS, given) if v is not None})
    for name, allowed in (("fold_k", FOLDS), ("fold_v", FOLDS), ("unpack3_k", UNPACK3), ("unpack3_v", UNPACK3)):
        if launch[name] not in allowed:
            raise ValueError(f"{name}={launch[name]!r} is invalid; allowed: {sorted(allowed)}")
    if launch["swap_qk"] and launch["swap_pv"]:
        raise ValueError("swap_qk=True with swap_pv=True is invalid; allowed: at most one (Triton 3.6 miscompiles "
                         "the pair: wrong results or illegal memory accesses on an H100)")
    if launch["asm"] and not target.ptx:
        raise ValueError("asm=True needs a CUDA device outside Triton's interpreter (inline PTX)")
    return tuple(launch[k] for k in LAUNCH_KEYS)


def split_count(batch_heads: int, n_q: int, block_n: int, sms: int, per_sm: int = 4,
                fit: int | None = None) -> tuple[int, int]:
    """(quantized splits, tokens per split): about ``per_sm`` programs per SM, whole tiles per split.

    With fewer rows (batch x KV heads) than SMs the split count per row rounds down, so that the
    programs never exceed ``per_sm`` per SM (rounding up launched a second, nearly empty wave). With
    as many rows as SMs or more, ``fit`` (programs per SM under the launch's register cap) lets
    :func:`whole_waves` move the count to one that fills whole waves.
    """
    tiles = -(-n_q // block_n)
    if tiles == 0:
        return 0, block_n
    slots = per_sm * sms
    want = max(1, slots // batch_heads if batch_heads < sms else -(-slots // batch_heads))
    if fit and batch_heads >= sms:  # programs that fit per SM known: prefer a count that fills whole waves
        want = whole_waves(batch_heads, tiles, want, fit * sms)
    per = -(-tiles // min(want, tiles))
    return -(-tiles // per), per * block_n


def programs_per_sm(maxnreg: int, num_warps: int) -> int:
    """Programs of ``num_warps`` warps capped at ``maxnreg`` registers that fit on an SM (65,536 registers;
    shared memory is not counted: every capped table entry is register-bound)."""
    return 65536 // (maxnreg * 32 * num_warps)


@functools.lru_cache(maxsize=4096)  # on the decode path per layer and step; its arguments change per tile
def whole_waves(rows: int, tiles: int, want: int, slots: int) -> int:
    """The split count per row near ``want`` whose programs fill whole waves of ``slots`` best.

    Time per row ~ waves x tokens per split ~ ceil(rows x s / slots) / s. A count moves only when
    that is 3 % better, and then to the best count up to ``2 want + 1`` (the nearest to ``want`` on
    ties); only up to 2.5 waves, beyond which moving measured slower.
    """
    def count(s: int) -> int:  # whole tiles per split: the split count really launched
        return -(-tiles // -(-tiles // s))

    def cost(s: int) -> float:
        return -(-rows * count(s) // slots) / count(s)

    if rows * count(want) > 2.5 * slots:
        return want
    best = min(range(1, min(2 * want + 1, tiles) + 1), key=lambda s: (cost(s), abs(s - want)))
    return best if cost(best) < 0.97 * cost(want) else want


def pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (``triton.next_power_of_2`` without its constexpr wrapper,
    which cost ~5 µs per call on the decode path)."""
    return 1 << (x - 1).bit_length() if x > 1 else 1
