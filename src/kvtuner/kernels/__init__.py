"""Which implementation runs the cache's hot spots: the PyTorch reference or the Triton kernels.

``"auto"`` (default) uses Triton for tensors on a CUDA device when Triton imports, the reference
otherwise; ``set_backend("torch")`` forces the reference everywhere, ``set_backend("triton")``
forces the kernels on CUDA tensors (CPU tensors take the reference, except under Triton's
interpreter, see :func:`use_triton`). The environment variable ``KVTUNER_BACKEND`` sets the
initial value.
"""

from __future__ import annotations

import functools
import os

BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("KVTUNER_BACKEND", "auto")


def set_backend(name: str) -> None:
    """Choose ``"auto"``, ``"torch"`` or ``"triton"`` for every cache from now on."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is invalid; allowed: {', '.join(BACKENDS)}")
    if name == "triton" and not triton_available():
        raise ImportError("backend 'triton' needs Triton; install the extra: pip install 'kvtuner[gpu]'")
    _backend = name


def get_backend() -> str:
    return _backend


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(device) -> bool:
    """Whether tensors on ``device`` go through the Triton kernels under the current backend.

    CPU tensors take the kernels only when the backend is forced to ``"triton"`` *and* Triton's
    interpreter is on (``TRITON_INTERPRET=1``): that is how the kernels are tested without a GPU.
    """
    if _backend == "torch" or not triton_available():
        return False
    if getattr(device, "type", str(device)) == "cuda":
        return True
    return _backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
