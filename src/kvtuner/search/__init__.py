"""Search per-layer (k_bits, v_bits) pairs: Pareto pruning, layer clustering, an exact budget solver,
and NSGA-II over measured quality (``search`` extra for the last two steps' clustering/Optuna)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..spec import KVPlan
from .front import FrontPoint, ParetoFront, pareto_points
from .pareto import non_dominated, prune_pairs, solve_frontier
from .space import SearchSpace, build_space

__all__ = ["FrontPoint", "ParetoFront", "SearchSpace", "build_space", "non_dominated", "prune_pairs", "search",
           "solve_frontier"]


def search(table, *, mode: str = "kivi", max_bits: float = 16.0, quality: Callable[[KVPlan], float] | None = None,
           n_trials: int = 40, storage: str | os.PathLike[str] | None = None, study_name: str | None = None,
           eps: float = 0.05, cluster: bool = True, seed: int = 0, progress: bool = True,
           metric: str = "kl", rotated=None, refine: int = 0, refine_width: int = 4) -> ParetoFront:
    """Search plans for ``table``'s model.

    Without ``quality`` this returns the solver's exact proxy frontier (additive profiled errors).
    With it (e.g. :class:`kvtuner.search.objectives.KLObjective`), NSGA-II measures plans under the
    ``max_bits`` constraint, warm-started from the solver, and the front holds measured points.
    ``rotated`` (a table of the same model profiled with ``rotation=True``) lets every layer choose
    between plain and rotated storage (:func:`build_space`). ``refine`` adds that many measured trials of
    budget-keeping local search around the best measured plan (:func:`~.optuna_backend.refine_study`).
    """
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0 or (refine and quality is None):
        raise ValueError(f"refine={refine!r} is invalid; allowed: 0, or a positive count of trials with a quality")
    space = build_space(table, mode, eps=eps, cluster=cluster, rotated=rotated)
    solver = [FrontPoint(space.plan(c, {"source": "solver", "proxy_error": e}), bits, e) for bits, e, c in
              space.solver_frontier()]
    info: dict[str, Any] = {"groups": space.groups, "search_space_size": space.size,
                            "candidates": [[list(p) for p in c] for c in space.candidates]}
    if quality is None:
        return ParetoFront(solver, mode, "proxy", info)
    from .optuna_backend import run_study

    name = study_name or f"kvtuner-{table.model_id or 'model'}-{mode}-{max_bits:g}"
    points, study_info = run_study(space, quality, max_bits=max_bits, n_trials=n_trials,
                                   storage=storage or f"{name}.db", study_name=name, seed=seed, progress=progress,
                                   refine=refine, refine_width=refine_width)
    info.update(study_info)
    if not points:
        info["note"] = "no feasible trial completed"
        return ParetoFront([p for p in solver if p.equivalent_bits <= max_bits], mode, "proxy", info)
    return ParetoFront(pareto_points(points), mode, metric, info)
