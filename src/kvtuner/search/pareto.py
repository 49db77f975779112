"""Pareto pruning of (k_bits, v_bits) pairs inside a layer, and the exact budget solver (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence

Pair = tuple[int, int]


def pair_cost(pair: Pair) -> int:
    """Bit units of a pair: k_bits + v_bits (twice its equivalent bits), an integer."""
    return pair[0] + pair[1]


def non_dominated(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (minimise both).

    Exact duplicates are all kept (neither strictly beats the other).
    """
    keep = []
    for i, (a, b) in enumerate(points):
        if not any(c <= a and d <= b and (c < a or d < b) for j, (c, d) in enumerate(points) if j != i):
            keep.append(i)
    return keep


def prune_pairs(pairs: Sequence[Pair], errors: Sequence[float]) -> list[Pair]:
    """The pairs on the (equivalent bits, error) Pareto frontier of one layer, cheapest first."""
    idx = non_dominated([(pair_cost(p), e) for p, e in zip(pairs, errors)])
    return sorted((tuple(pairs[i]) for i in idx), key=lambda p: (pair_cost(p), p))


def solve_frontier(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]]
                   ) -> list[tuple[int, float, list[int]]]:
    """Exact multiple-choice knapsack for every budget at once.

    Item ``g`` (a layer or a group of layers) takes exactly one option ``i`` with integer cost
    ``costs[g][i]`` and error ``errors[g][i]``; errors add across items. Returns the Pareto frontier
    ``[(total_cost, total_error, choice), ...]`` by increasing cost, where ``choice[g]`` is the
    option index; the best plan for a budget is the last entry whose cost fits.
    """
    import numpy as np

    if not costs:
        return []
    max_total = sum(max(c) for c in costs)
    inf = float("inf")
    best = np.full(max_total + 1, inf)
    best[0] = 0.0
    choices: list[np.ndarray] = []
    for cost_row, err_row in zip(costs, errors):
        new = np.full(max_total + 1, inf)
        arg = np.full(max_total + 1, -1, dtype=np.int64)
        for i, (c, e) in enumerate(zip(cost_row, err_row)):
            shifted = np.full(max_total + 1, inf)
            shifted[c:] = best[: max_total + 1 - c] + e
            better = shifted < new
            new[better], arg[better] = shifted[better], i
        choices.append(arg)
        best = new
    frontier, running = [], inf
    for total in range(max_total + 1):
        if best[total] < running:
            running = best[total]
            choice, t = [], total
            for g in range(len(costs) - 1, -1, -1):
                i = int(choices[g][t])
                choice.append(i)
                t -= costs[g][i]
            frontier.append((total, float(best[total]), choice[::-1]))
    return frontier
