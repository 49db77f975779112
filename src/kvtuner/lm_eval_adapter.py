"""Run any lm-evaluation-harness task with a plan's quantized KV cache (``eval`` extra).

Both request kinds go through :class:`MixedPrecisionCache`: generation tasks (e.g. GSM8K, as in
the paper) pass a fresh cache to ``generate``; log-likelihood tasks run their forward pass
through a fresh cache too, so the scored tokens attend to quantized history. (The official
KVTuner code runs log-likelihood tasks without quantization, so such scores never change.)

Example:
    >>> import lm_eval
    >>> lm = kvtuner_lm(model, tokenizer, plan)
    >>> lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"], num_fewshot=4, limit=200)
"""

from __future__ import annotations

from typing import Any

from .spec import KVPlan


def _require_lm_eval():
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError("the lm-eval adapter needs lm-eval; install the extra: pip install 'kvtuner[eval]'") from e
    return HFLM


def kvtuner_lm(model: Any, tokenizer: Any, plan: KVPlan | None, **hflm_kwargs: Any):
    """An lm-eval ``HFLM`` that evaluates ``model`` with ``plan``'s cache (None: full precision)."""
    HFLM = _require_lm_eval()
    from .evaluation import make_cache
    from .models import with_cache

    class KVTunerLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            import torch

            with torch.no_grad():
                return self.model(inps, **with_cache(self.model, make_cache(self.model, plan)), use_cache=True).logits

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            generation_kwargs.update(with_cache(self.model, make_cache(self.model, plan)))
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    if plan is not None:
        plan.check_config(model.config)
    hflm_kwargs.setdefault("device", str(model.device))
    hflm_kwargs.setdefault("batch_size", 1)
    return KVTunerLM(pretrained=model, tokenizer=tokenizer, **hflm_kwargs)
