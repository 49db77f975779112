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


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory):
    """``saved_tiny_model(arch, **tiny_model_kwargs)``: a directory holding a tiny random model and a 120-token
    BPE tokenizer trained on the built-in text, saved like a hub checkpoint (what ``--model DIR`` loads)."""
    made = {}

    def make(arch: str = "llama", **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key in made:
            return made[key]
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        from kvtuner.data import default_texts
        from kvtuner.testing import tiny_model

        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator([default_texts("calibration")[:20000]], trainers.BpeTrainer(
            vocab_size=120, limit_alphabet=60, special_tokens=["<unk>", "<s>", "</s>"]))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        fast.save_pretrained(d)
        tiny_model(arch, vocab=128, **kw).save_pretrained(d)
        made[key] = d
        return d

    return make
