"""Shared fixtures. Run everything with `python -m pytest`; skip the SmolLM2 tests with `-m "not slow"`."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported (transformers may import it early): the kernel
    # tests then run in the interpreter. It changes nothing else: CPU tensors take the kernels only
    # under kvtuner.set_backend("triton").
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32) and its tokenizer, loaded once per session."""
    from kvtuner import load_model

    return load_model("smollm2")
