"""A cheaper launch path for Triton kernels called once per layer and decode step.

``kernel[grid](...)`` re-binds every argument, specialises it and looks the binary up on each
call: on an H100 host that took ~190 µs per :func:`~kvtuner.kernels.decode_attention` call (two
launches) for ~7 µs of GPU work at batch 1 (``docs/kernels.md``), so eager decoding at small batch
was host-bound. :class:`CachedLauncher` keys each call by what
Triton specialises on, at least as finely as Triton does, and calls the compiled binary directly
when the key was seen; a new key (or any failure of the direct path) takes the ordinary launch,
which compiles if needed and returns the binary to remember.

Key: the current device, then per positional (runtime) argument: tensors by dtype and 16-byte alignment of the data
pointer; integers by divisibility by 16, equality to 1 and the integer type they need (int32,
int64, uint64); floats by type. Keyword arguments (constexprs and launch options) by value. Triton
folds the same properties into its own cache key (``do_not_specialize`` only makes Triton's key
coarser), so two calls with the same key here run the same binary there.
"""

from __future__ import annotations

import torch
from triton import knobs
from triton.runtime import driver


def _spec(a):
    """The key of one argument other than an exact ``int`` (:func:`spec_key` keys those inline)."""
    t = type(a)  # exact-type checks first: this runs for every argument of every call
    if t is float:
        return float
    if t is bool:
        return bool, a
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15 == 0
    if isinstance(a, int):  # int subclasses (numpy-like wrappers): keyed as the int they hold
        return spec_key((int(a),), {})[0][0]
    raise TypeError(f"argument of type {t.__name__} is not supported by the cached launch")


def spec_key(args: tuple, kwargs: dict) -> tuple:
    """The cache key of one call (module docstring)."""
    # integers (most arguments: strides, sizes) inline, without a call each
    return tuple([(a & 15 == 0, a == 1, -2**31 <= a < 2**31, a < 2**63) if type(a) is int else _spec(a)
                  for a in args]), tuple(kwargs.items())


class CachedLauncher:
    """``launcher(grid, *runtime_args, **constexprs_and_options)``: same call as ``kernel[grid]``,
    returns the compiled kernel. Runtime arguments must be passed by position, in signature order,
    and constexprs by keyword."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.cache: dict[tuple, tuple] = {}
        self.enabled = True
        self.hits = 0

    def __call__(self, grid: tuple, *args, **kwargs):
        key = None
        if self.enabled:
            try:  # binaries are loaded per device, as in Triton's own cache
                dev = self.device()
                key = (dev, spec_key(args, kwargs))
            except Exception:  # noqa: BLE001 - no device, or an argument the key does not cover
                key = None
            entry = self.cache.get(key) if key is not None else None
            if entry is not None:
                compiled, tail = entry
                try:
                    self._run(compiled, grid, args + tail, dev)
                    self.hits += 1
                    return compiled
                except Exception:  # noqa: BLE001 - a Triton without this internal API: ordinary launches
                    self.enabled = False
        compiled = self.kernel[grid](*args, **kwargs)
        if self.enabled and key is not None and hasattr(compiled, "run"):
            # the parameters after the runtime arguments (constexprs, part of the key), in signature
            # order, with their defaults
            tail = tuple(kwargs.get(p.name, p.default) for p in self.kernel.params[len(args):])
            self.cache[key] = (compiled, tail)
        return compiled

    @staticmethod
    def device():
        return driver.active.get_current_device()

    @staticmethod
    def stream(device):
        return driver.active.get_current_stream(device)

    def _run(self, compiled, grid: tuple, all_args: tuple, device) -> None:
        stream = self.stream(device)
        g = (*grid, 1, 1)
        enter = knobs.runtime.launch_enter_hook  # profilers' hooks get the launch metadata, as from Triton
        meta = compiled.launch_metadata(grid, stream, *all_args) if enter is not None else None
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, meta, enter,
                     knobs.runtime.launch_exit_hook, *all_args)
