"""Budget-keeping moves around a plan, ranked by the solver's proxy.

NSGA-II's mutations ignore the budget: at a tight budget most of its proposals are over it (42 of 48 in
the SmolLM2 study resumed to 60 trials) and none of those is worth measuring. Local moves that keep the
plan within the budget spend every measurement on a candidate that could be chosen. The proxy (summed
one-layer costs) is additive, so it ranks the moves; the measured objective decides.
"""

from __future__ import annotations

from .space import SearchSpace


def budget_moves(space: SearchSpace, choice: list[int], max_bits: float) -> list[tuple[float, list[int]]]:
    """``[(proxy change, neighbour)]``, best first: every plan within ``max_bits`` that differs from
    ``choice`` in one group's option, or in two groups' options moved one step each in opposite
    directions (one group gains precision, the other pays for it)."""
    costs, errs = space.group_costs(), space.group_errors()
    limit = max_bits * 2 * space.num_layers + 1e-9  # pair costs are in k + v bit units
    total = sum(costs[g][c] for g, c in enumerate(choice))
    moves: dict[tuple[int, ...], float] = {}

    def add(new: list[int]) -> None:
        key = tuple(new)
        if key != tuple(choice) and key not in moves and \
                total + sum(costs[g][new[g]] - costs[g][choice[g]] for g in range(len(new))) <= limit:
            moves[key] = sum(errs[g][new[g]] - errs[g][choice[g]] for g in range(len(new)))

    for g in range(len(choice)):
        for option in range(len(costs[g])):
            add(choice[:g] + [option] + choice[g + 1:])
    for up in range(len(choice)):  # options are high precision first: a lower index is dearer
        if choice[up] == 0:
            continue
        for down in range(len(choice)):
            if down != up and choice[down] + 1 < len(costs[down]):
                new = list(choice)
                new[up] -= 1
                new[down] += 1
                add(new)
    return sorted(((d, list(k)) for k, d in moves.items()), key=lambda m: (m[0], m[1]))
