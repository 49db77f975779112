"""Shared fixtures. Run everything with `python -m pytest`; skip the SmolLM2 tests with `-m "not slow"`.

Tests marked ``gpu`` need a CUDA GPU and Triton; elsewhere they are skipped with that reason.
"""

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
TRITON = importlib.util.find_spec("triton") is not None

if not CUDA:
    # Triton reads this when it is first imported (transformers may import it early): the kernel
    # tests then run in the interpreter. It changes nothing else: CPU tensors take the kernels only
    # under KernelPolicy(backend="triton").
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if CUDA and TRITON:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and Triton")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32) and its tokenizer, loaded once per test run."""
    from kvtuner import load_model

    return load_model("smollm2")
