"""One line saying which code, machine and versions produced a result (every results file carries it), and
the one way a script shows and saves its result."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def provenance() -> str:
    import torch
    import transformers

    import kvtuner

    commit = os.environ.get("KVTUNER_COMMIT")  # a copy of the tree without .git (a remote GPU machine) names it
    try:
        if commit:
            raise OSError
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        commit += " with uncommitted changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = commit or "unknown (not a git checkout)"
    machine = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
               else f"{os.cpu_count()}-core {platform.machine()} CPU")
    return (f"kvtuner {kvtuner.__version__} at commit {commit}; {machine}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def publish(text: str, out: str | None) -> None:
    """Print a result and, with ``--out``, write it there (ending in one newline)."""
    print(text)
    if out:
        Path(out).write_text(text if text.endswith("\n") else text + "\n")


# HBM bandwidth of the GPUs results are reported for (vendor figures, bytes/s): the share-of-peak columns
HBM_PEAK = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12}


def hbm_peak(name: str | None = None) -> float:
    """Peak HBM bandwidth of the GPU named ``name`` (default: device 0), or a clear error for one not listed."""
    if name is None:
        import torch

        name = torch.cuda.get_device_name(0)
    for key, peak in HBM_PEAK.items():
        if key in name:
            return peak
    raise ValueError(f"no HBM peak known for {name!r}; allowed: GPUs named like {', '.join(HBM_PEAK)} "
                     "(add its vendor figure to provenance.HBM_PEAK)")
