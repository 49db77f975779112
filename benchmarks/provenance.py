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
