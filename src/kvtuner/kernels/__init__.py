"""Triton kernels for the cache's hot spots (needs Triton; :class:`kvtuner.KernelPolicy` decides when they run).

Modules, in the order a decode step meets them:

* :mod:`.quantize`: quantize and pack a block of tokens on append (same results as ``quant.quantize``);
* :mod:`.decode`: the entry point of the fused decode attention over the packed cache
  (``decode_attention``; its specification is :func:`kvtuner.attention.decode_attention`);
* :mod:`.launch_config`: tile, warps, register cap and split count per bit pair, from rules and a
  measured table per GPU model (``tables/``);
* :mod:`.decode_kernel`: the split and merge kernels;
* :mod:`.unpack` and :mod:`.ptx`: packed codes to fp16 in registers;
* :mod:`.launcher`: a cheaper launch path for kernels called once per layer and step.
"""

from __future__ import annotations

from .decode import Launch, decode_attention, max_int32_offset, plan_launch
from .launch_config import (LAUNCH_KEYS, LAYOUTS, Target, default_block_n, launch_choices, launch_defaults,
                            launch_table, programs_per_sm, split_count, table_name)
from .quantize import quantize

__all__ = [
    "LAUNCH_KEYS",
    "LAYOUTS",
    "Launch",
    "Target",
    "decode_attention",
    "default_block_n",
    "launch_choices",
    "launch_defaults",
    "launch_table",
    "max_int32_offset",
    "plan_launch",
    "programs_per_sm",
    "quantize",
    "split_count",
    "table_name",
]
