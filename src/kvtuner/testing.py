"""Helpers for tests (shipped with the package): tiny random models and verbose closeness checks."""

from __future__ import annotations

from typing import Any

import torch

ARCHS = ("llama", "qwen2", "gemma3")


def tiny_model(arch: str = "llama", *, layers: int = 4, heads: int = 4, kv_heads: int = 2, head_dim: int = 32,
               vocab: int = 128, sliding_window: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A randomly initialised causal LM built from a config (no download).

    ``gemma3`` alternates sliding-window and full-attention layers (window ``sliding_window``).
    """
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    common = dict(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=head_dim, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif arch == "gemma3":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        config = Gemma3TextConfig(**common, sliding_window=sliding_window, layer_types=types)
        cls = Gemma3ForCausalLM
    else:
        raise ValueError(f"arch={arch!r} is invalid; allowed: {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    # Random init gives near-uniform logits; larger embeddings make next-token choices decisive.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20.0)
    return model


def error_report(ref: torch.Tensor, out: torch.Tensor) -> str:
    diff = (ref.float() - out.float()).abs()
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
    rel = (diff.norm() / ref.float().norm().clamp_min(1e-30)).item()
    return f"max|diff|={diff.max().item():.3e} mean|diff|={diff.mean().item():.3e} rel_rms={rel:.3e} worst={worst}"


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, atol: float = 0.0) -> None:
    """Relative RMS error ``||ref - out|| / ||ref||`` at most ``ratio`` (or max abs diff <= atol)."""
    diff = (ref.float() - out.float()).abs()
    if atol and diff.max().item() <= atol:
        return
    rel = (diff.norm() / ref.float().norm().clamp_min(1e-30)).item()
    assert rel <= ratio, f"{name}: relative error {rel:.3e} > {ratio:.3e}; {error_report(ref, out)}"
