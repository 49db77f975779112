"""``kvtuner.tune``: pick a plan for a model from measurements on held-out text.

This first tuner measures the uniform key-first pairs (KV8, K8V4, KV4, K4V2, KV2, the set that
KVTuner's Pareto pruning keeps in most layers) through the real cache and returns the cheapest
one whose perplexity stays within ``tolerance`` of full precision. Per-layer profiling and the
multi-objective search refine this into mixed per-layer plans.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .evaluation import perplexity
from .spec import KVPlan, ModelDims, PlanError

KEY_FIRST_PAIRS = ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))


@dataclass
class TuneResult:
    plan: KVPlan
    full_ppl: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per measured candidate


def tune_uniform(model: Any, input_ids: Any, *, mode: str = "kivi", tolerance: float = 0.01,
                 pairs: tuple[tuple[int, int], ...] = KEY_FIRST_PAIRS, prefill: int = 128, chunk_size: int = 16,
                 model_id: str | None = None, progress: Callable[[str], None] | None = None) -> TuneResult:
    """Measure each uniform pair and return the cheapest plan within ``tolerance`` relative perplexity.

    Falls back to the best-quality pair if none meets the tolerance (the rows say so).
    """
    if tolerance < 0:
        raise PlanError(f"tolerance={tolerance} is invalid; allowed: >= 0")
    n_layers = model.config.get_text_config().num_hidden_layers
    full = perplexity(model, input_ids, None, prefill=prefill, chunk_size=chunk_size)
    rows = []
    for k, v in pairs:
        plan = KVPlan.uniform(n_layers, k, v, mode, model_id=model_id)
        if progress:
            progress(plan.layers[0].name)
        ppl = perplexity(model, input_ids, plan, prefill=prefill, chunk_size=chunk_size)
        rows.append(dict(pair=plan.layers[0].name, k_bits=k, v_bits=v, mode=mode,
                         equivalent_bits=plan.equivalent_bits, bytes_per_token=plan.bytes_per_token(model.config),
                         ppl=ppl, ppl_increase=ppl / full - 1, plan=plan))
    ok = [r for r in rows if r["ppl_increase"] <= tolerance]
    best = min(ok, key=lambda r: (r["bytes_per_token"], r["ppl"])) if ok else min(rows, key=lambda r: r["ppl"])
    chosen = KVPlan(best["plan"].layers, model_id=model_id, model=ModelDims.from_config(model.config).fingerprint(),
                    provenance={
        "source": "kvtuner.tune_uniform", "mode": mode, "tolerance": tolerance, "tokens": int(input_ids.shape[1]),
        "full_ppl": full, "ppl": best["ppl"], "met_tolerance": bool(ok)})
    for r in rows:
        r.pop("plan")
    return TuneResult(chosen, full, rows)
