"""The clustered search space and the solver's proxy frontier."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..spec import KVPlan, LayerSpec, PlanError
from .cluster import cluster_layers
from .pareto import pair_cost, prune_pairs, solve_frontier

Pair = tuple[int, ...]  # (k_bits, v_bits), or (k_bits, v_bits, 1) for a Hadamard-rotated option


@dataclass
class SearchSpace:
    """Per-layer pruned candidates, layer groups, and the proxy error of every (layer, pair)."""

    mode: str
    num_layers: int
    candidates: list[list[Pair]]  # per layer, cheapest first
    groups: list[list[int]]
    errors: list[dict[Pair, float]]  # per layer: pair -> profiled attention-output error
    model: dict | None = None
    model_id: str | None = None
    metric: str = "attention"
    rotation: bool = False
    sink_length: int = 0  # the table's full-precision sink tokens, kept by every plan

    def group_candidates(self, g: int) -> list[Pair]:
        """A group's options, high precision first (as in the paper's templates)."""
        return sorted(self.candidates[self.groups[g][0]], key=lambda p: (-pair_cost(p), p))

    @property
    def size(self) -> int:
        n = 1
        for g in range(len(self.groups)):
            n *= len(self.group_candidates(g))
        return n

    def plan(self, choice: list[int], provenance: dict | None = None) -> KVPlan:
        """The plan that gives group ``g`` its option ``choice[g]``."""
        pairs: list[Pair | None] = [None] * self.num_layers
        for g, layers in enumerate(self.groups):
            pair = self.group_candidates(g)[choice[g]]
            for layer in layers:
                pairs[layer] = pair
        layers = tuple(LayerSpec.pair(p[0], p[1], self.mode, rotation=self.rotation or len(p) > 2,
                                      sink_length=self.sink_length) for p in pairs)
        return KVPlan(layers, model_id=self.model_id, model=self.model, provenance=provenance or {})

    def proxy_error(self, choice: list[int]) -> float:
        return sum(self.errors[layer][self.group_candidates(g)[choice[g]]]
                   for g, layers in enumerate(self.groups) for layer in layers)

    def group_costs(self) -> list[list[int]]:
        """``[g][option]``: the option's k + v bits summed over the group's layers."""
        return [[pair_cost(p) * len(layers) for p in self.group_candidates(g)] for g, layers in enumerate(self.groups)]

    def group_errors(self) -> list[list[float]]:
        """``[g][option]``: the option's profiled error summed over the group's layers."""
        return [[sum(self.errors[layer][p] for layer in layers) for p in self.group_candidates(g)]
                for g, layers in enumerate(self.groups)]

    def solver_frontier(self) -> list[tuple[float, float, list[int]]]:
        """``[(equivalent_bits, proxy_error, choice)]``: the exact proxy optimum for every budget."""
        return [(total / (2 * self.num_layers), err, choice)
                for total, err, choice in solve_frontier(self.group_costs(), self.group_errors())]


def build_space(table, mode: str = "kivi", *, eps: float = 0.05, min_samples: int = 2,
                pairs: list[Pair] | None = None, cluster: bool = True, metric: str = "auto",
                rotated=None) -> SearchSpace:
    """Prune each layer's pairs to its Pareto set, then cluster layers (``cluster=False``: one group
    per layer).

    ``rotated``: a second table of the same model profiled with ``rotation=True``. Each layer then
    chooses between plain and rotated storage per pair: the rotated options join the candidates as
    ``(k_bits, v_bits, 1)`` and the Pareto pruning keeps, at each cost, whichever is better there.

    ``metric`` is the per-(layer, pair) cost: ``"attention"`` (relative attention-output error),
    ``"kl"`` (measured one-layer end-to-end KL, ``profile(kl_pairs=...)``), or ``"auto"``: KL when the
    table holds it for every pair, since it is what the search finally optimises.
    """
    if mode not in table.modes:
        raise PlanError(f"mode={mode!r} is not in the table; allowed: {', '.join(table.modes)}")
    pairs = [tuple(p) for p in (pairs or table.pairs)]
    for p in pairs:
        if p not in table.pairs:
            raise PlanError(f"pair {list(p)} was not profiled; allowed: {[list(q) for q in table.pairs]}")
    kl = table.kl.get(mode, {})
    have_kl = all(LayerSpec.pair(*p).name in kl for p in pairs if p != (16, 16))
    if metric not in ("auto", "attention", "kl"):
        raise PlanError(f"metric={metric!r} is invalid; allowed: 'auto', 'attention' or 'kl'")
    if metric == "kl" and not have_kl:
        raise PlanError("metric='kl' needs one-layer KL for every pair; allowed: a table profiled with "
                        "kl_pairs covering the pairs (profile(..., kl_pairs=...), or the tables kvtuner tune writes)")
    use_kl = metric == "kl" or (metric == "auto" and have_kl)

    def cost(layer: int, p: Pair) -> float:
        if not use_kl:
            return table.error(mode, layer, p)
        if p == (16, 16):
            return 0.0
        value = kl[LayerSpec.pair(*p).name][layer]
        return math.inf if value is None else value  # not measured: pruned before KL, never a candidate

    errors = [{p: cost(layer, p) for p in pairs} for layer in range(table.num_layers)]
    options = list(pairs)
    if rotated is not None:
        _check_rotated(table, rotated, mode)
        other = build_space(rotated, mode, pairs=[p for p in pairs if p != (16, 16)], cluster=False,
                            metric="kl" if use_kl else "attention")
        for layer in range(table.num_layers):
            errors[layer].update({(*p, 1): e for p, e in other.errors[layer].items()})
        options += [(*p, 1) for p in pairs if p != (16, 16)]
    candidates = [[p for p in prune_pairs(options, [errors[layer][p] for p in options])
                   if math.isfinite(errors[layer][p])] for layer in range(table.num_layers)]
    if cluster:
        vectors = [[errors[layer][p] for p in candidates[layer]] for layer in range(table.num_layers)]
        groups = cluster_layers(candidates, vectors, eps=eps, min_samples=min_samples)
    else:
        groups = [[layer] for layer in range(table.num_layers)]
    return SearchSpace(mode, table.num_layers, candidates, groups, errors, model=dict(table.model),
                       model_id=table.model_id, metric="kl" if use_kl else "attention",
                       rotation=getattr(table, "rotation", False) and rotated is None,
                       sink_length=getattr(table, "sink_length", 0))


def _check_rotated(table, rotated, mode: str) -> None:
    if getattr(table, "rotation", False) or not getattr(rotated, "rotation", False):
        raise PlanError("rotated= needs a plain table and a table profiled with rotation=True; allowed: "
                        "profile(..., rotation=False) and profile(..., rotation=True) of the same model")
    if getattr(rotated, "sink_length", 0) != getattr(table, "sink_length", 0):
        raise PlanError(f"the rotated table keeps {rotated.sink_length} sink tokens and the plain one "
                        f"{table.sink_length}; allowed: the same sink_length")
    if rotated.num_layers != table.num_layers or mode not in rotated.modes:
        raise PlanError(f"the rotated table ({rotated.num_layers} layers, modes {rotated.modes}) does not match "
                        f"the plain one ({table.num_layers} layers, mode {mode!r}); allowed: the same model and mode")
