"""Shared fixtures. Run everything with `python -m pytest`; skip the SmolLM2 tests with `-m "not slow"`."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32) and its tokenizer, loaded once per session."""
    from kvtuner import load_model

    return load_model("smollm2")
