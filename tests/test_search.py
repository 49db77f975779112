"""Search on synthetic tables: pruning, the exact solver, clustering, the front artefact, and Optuna
studies that survive killed workers and share work between processes."""

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from kvtuner.profiling import SensitivityTable
from kvtuner.search import ParetoFront, prune_pairs, search, solve_frontier
from kvtuner.search.cluster import cluster_layers

PAIRS = [(k, v) for k in (8, 4, 2) for v in (8, 4, 2)]


def synthetic_table(num_layers=6, seed=0):
    """Errors with the paper's structure: keys matter more; layer sensitivity varies by a factor."""
    rng = random.Random(seed)
    base = {8: 0.01, 4: 0.1, 2: 0.5}
    rows = []
    for layer in range(num_layers):
        s = [1.0, 1.0, 3.0, 3.0, 0.5, 0.5][layer % 6] * (1 + 0.01 * rng.random())
        rows.append([s * (1.5 * base[k] + base[v]) for k, v in PAIRS])
    model = {"num_layers": num_layers, "num_kv_heads": 2, "head_dim": 32, "model_type": "llama"}
    bits = [[0.0, 0.0, 0.0] for _ in range(num_layers)]
    return SensitivityTable("synthetic", model, "0" * 64, 1024, 512, ("kivi",), tuple(PAIRS), (8, 4, 2),
                            {"kivi": rows}, {"kivi": bits}, {"kivi": bits})


def test_pruning_keeps_exactly_the_non_dominated_pairs():
    errors = {(8, 8): 0.01, (8, 4): 0.1, (8, 2): 0.4, (4, 8): 0.17, (4, 4): 0.2, (4, 2): 0.45, (2, 8): 0.88,
              (2, 4): 0.89, (2, 2): 0.96}  # KVTuner Table 3 (Llama-3.1-8B per-token)
    kept = prune_pairs(list(errors), list(errors.values()))
    assert kept == [(2, 2), (4, 2), (4, 4), (8, 4), (8, 8)]  # the paper's key-first set


def test_solver_matches_brute_force():
    rng = random.Random(1)
    for _ in range(20):
        n = rng.randint(1, 4)
        costs = [[rng.choice([4, 6, 8, 12, 16]) for _ in range(3)] for _ in range(n)]
        errors = [[rng.random() for _ in range(3)] for _ in range(n)]
        frontier = solve_frontier(costs, errors)
        for budget in range(0, 16 * n + 1):
            brute = min((sum(errors[g][c[g]] for g in range(n)) for c in itertools.product(range(3), repeat=n)
                         if sum(costs[g][c[g]] for g in range(n)) <= budget), default=None)
            fits = [f for f in frontier if f[0] <= budget]
            if brute is None:
                assert not fits
            else:
                total, err, choice = fits[-1]
                assert err == pytest.approx(brute)
                assert sum(costs[g][choice[g]] for g in range(n)) == total <= budget


def test_clustering_groups_identical_vectors():
    cands = [[(2, 2), (4, 4)]] * 5 + [[(2, 2), (8, 8)]]
    vectors = [[0.5, 0.1], [0.9, 0.3], [0.5, 0.1], [0.9, 0.3], [0.2, 0.01], [0.5, 0.1]]
    groups = cluster_layers(cands, vectors, eps=0.05)
    assert groups == [[0, 2], [1, 3], [4], [5]]  # layer 5 has another candidate set; layer 4 is noise


def test_proxy_front_is_monotone_and_respects_budgets(tmp_path):
    front = search(synthetic_table(), mode="kivi", progress=False)
    bits = [p.equivalent_bits for p in front.points]
    errs = [p.proxy_error for p in front.points]
    assert bits == sorted(bits) and errs == sorted(errs, reverse=True)
    plan = front.best(3.25)
    assert plan.equivalent_bits <= 3.25
    assert front.info["groups"] == [[0, 1], [2, 3], [4, 5]]
    # sensitive layers (2, 3) get at least the bits of robust ones (4, 5)
    assert plan.layers[2].equivalent_bits >= plan.layers[4].equivalent_bits
    path = front.save(tmp_path / "front.json")
    again = ParetoFront.load(path)
    assert again.best(3.25) == plan and json.loads(path.read_text())["_type"] == "ParetoFront"


def _proxy_quality(table):
    errs = {(layer, p): e for layer in range(table.num_layers) for p, e in zip(table.pairs, table.output_error["kivi"][layer])}
    return lambda plan: sum(errs[(i, (s.k.bits, s.v.bits))] for i, s in enumerate(plan.layers))


def test_study_is_warm_started_and_meets_the_budget(tmp_path):
    table = synthetic_table()
    front = search(table, max_bits=3.25, quality=_proxy_quality(table), n_trials=15, storage=tmp_path / "s.db",
                   cluster=False, progress=False)
    assert front.metric == "kl" and all(p.equivalent_bits <= 3.25 for p in front.points)
    solver_best = search(table, progress=False, cluster=False)
    best_solver_err = min(p.proxy_error for p in solver_best.points if p.equivalent_bits <= 3.25)
    assert min(p.quality for p in front.points) == pytest.approx(best_solver_err)  # first warm start is the optimum
    again = search(table, max_bits=3.25, quality=_proxy_quality(table), n_trials=15, storage=tmp_path / "s.db",
                   cluster=False, progress=False)
    assert again.info["trials_complete"] == 15  # a rerun finds the study done instead of restarting


def test_study_measures_only_plans_within_the_budget(tmp_path):
    # constrained NSGA-II ranks infeasible trials by their violation alone: measuring them would only cost time
    table = synthetic_table()
    measured = []
    proxy = _proxy_quality(table)

    def quality(plan):
        measured.append(plan.equivalent_bits)
        return proxy(plan)

    front = search(table, max_bits=3.0, quality=quality, n_trials=40, storage=tmp_path / "s.db", cluster=False,
                   progress=False)
    assert measured and max(measured) <= 3.0 + 1e-9
    info = front.info
    assert info["trials_over_budget"] > 0  # the sampler proposed some; none was measured
    assert len(measured) == info["trials_complete"] - info["trials_over_budget"] - info["trials_cached"]
    assert all(p.equivalent_bits <= 3.0 for p in front.points)
    # every trial carries its budget violation as the sampler's constraint (optuna 5: Trial.set_constraint;
    # before: constraints_func), under the key the old list format used
    import optuna

    from kvtuner.search.optuna_backend import open_storage

    study = optuna.load_study(study_name=info["study_name"], storage=open_storage(tmp_path / "s.db"))
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert trials and all(set(t.constraints) == {"0"} for t in trials)
    assert all(abs(t.constraints["0"] - (t.user_attrs["bits"] - 3.0)) < 1e-9 for t in trials)
    assert any(t.constraints["0"] > 0 for t in trials) and any(t.constraints["0"] <= 0 for t in trials)


WORKER = r"""
import sys, time
sys.path.insert(0, {tests!r})
from test_search import synthetic_table, _proxy_quality
from kvtuner.search import search
table = synthetic_table(12)
q = _proxy_quality(table)
def slow(plan):
    time.sleep({delay})
    return q(plan)
search(table, max_bits=4.0, quality=slow, n_trials={n}, storage={storage!r}, study_name="w", cluster=False,
       progress=False, seed={seed})
"""


def _worker(storage, n, delay, seed=0):
    code = WORKER.format(tests=os.path.dirname(__file__), storage=str(storage), n=n, delay=delay, seed=seed)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _complete(storage):
    import optuna

    from kvtuner.search.optuna_backend import open_storage

    study = optuna.load_study(study_name="w", storage=open_storage(storage))
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


@pytest.mark.parametrize("storage_name", ["study.db", "study.journal"])
def test_killed_worker_loses_no_finished_trial(tmp_path, storage_name):
    storage = tmp_path / storage_name
    proc = _worker(storage, 30, 0.2)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            if len(_complete(storage)) >= 6:
                break
        except Exception:  # the study may not exist yet
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.values for t in _complete(storage)}
    assert len(before) >= 6
    proc = _worker(storage, 30, 0.0)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    after = {t.number: t.values for t in _complete(storage)}
    assert len(after) >= 30 and all(after[n] == v for n, v in before.items())


def test_two_workers_share_one_study(tmp_path):
    storage = tmp_path / "shared.journal"
    procs = [_worker(storage, 24, 0.1, seed=s) for s in (1, 2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    trials = _complete(storage)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) >= 24
    assert len(numbers) <= 25  # each worker stops once the study holds 24; at most one in flight overshoots
    measured = [tuple(sorted(t.params.items())) for t in trials if "cached_from" not in t.user_attrs]
    by_number = {t.number: t for t in trials}
    for t in trials:  # a repeated parameter set reuses an earlier measurement
        if "cached_from" in t.user_attrs:
            assert by_number[t.user_attrs["cached_from"]].params == t.params
    assert len(measured) >= 1


def test_kl_objective_is_zero_at_16_bits_and_positive_below():
    import torch

    from kvtuner import KVPlan
    from kvtuner.search.objectives import KLObjective
    from kvtuner.testing import tiny_model

    model = tiny_model("llama", layers=2)
    windows = [torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    objective = KLObjective(model, windows, prefill=48, chunk=8)
    assert objective.reference[0].shape[:2] == (2, 80 - 48)  # windows side by side, one prediction per token
    assert objective(KVPlan.uniform(2, 16, 16)) == 0.0
    low = KVPlan.uniform(2, 2, 2, "per_token")
    assert objective(low) > 0.0
    # side by side is exact: the mean of the windows measured one at a time
    alone = [KLObjective(model, [w], prefill=48, chunk=8)(low) for w in windows]
    assert abs(objective(low) - sum(alone) / 2) < 0.02 * max(alone)  # fp32 sums of a near-flat model


def test_budget_moves_are_every_one_and_two_step_neighbour_within_budget():
    from kvtuner.search import build_space
    from kvtuner.search.refine import budget_moves

    space = build_space(synthetic_table(), "kivi", cluster=False)
    sizes = [len(space.group_candidates(g)) for g in range(len(space.groups))]
    bits = [p.equivalent_bits for p in (space.plan(list(c)) for c in itertools.product(*map(range, sizes)))]
    assert min(bits) < 3.25 < max(bits)
    _, _, choice = [f for f in space.solver_frontier() if f[0] <= 3.25][-1]
    moves = budget_moves(space, choice, 3.25)
    deltas = [d for d, _ in moves]
    assert deltas == sorted(deltas)
    base = space.proxy_error(choice)
    expected = set()
    for cand in itertools.product(*map(range, sizes)):
        diff = [g for g in range(len(sizes)) if cand[g] != choice[g]]
        one = len(diff) == 1
        two = len(diff) == 2 and sorted(cand[g] - choice[g] for g in diff) == [-1, 1]
        if (one or two) and space.plan(list(cand)).equivalent_bits <= 3.25 + 1e-9:
            expected.add(cand)
    assert {tuple(c) for _, c in moves} == expected and len(moves) == len(expected)
    for d, c in moves:
        assert d == pytest.approx(space.proxy_error(c) - base)
    assert all(d >= -1e-12 for d in deltas)  # the solver's choice is the proxy optimum within the budget


def test_refine_finds_a_better_plan_the_proxy_misses_and_resumes(tmp_path):
    table = synthetic_table()
    proxy = _proxy_quality(table)
    solver_plan = search(table, progress=False, cluster=False).best(3.25)
    trap = solver_plan.pairs[2]
    measured = []

    def score(plan):  # the proxy, plus an interaction it cannot see: its optimum's layer-2 pair is bad
        return proxy(plan) + (1.0 if plan.pairs[2] == trap else 0.0)

    def quality(plan):
        measured.append(plan)
        return score(plan)

    kw = {"max_bits": 3.25, "quality": quality, "n_trials": 1, "storage": tmp_path / "r.db", "cluster": False,
          "progress": False}
    plain = search(table, **kw, study_name="plain")
    assert [p.plan.pairs for p in plain.points] == [solver_plan.pairs]  # one trial: the solver's optimum
    front = search(table, **kw, study_name="refined", refine=12, refine_width=3)
    info = front.info
    assert info["trials_refine"] == 12 and info["refine_start"] != info["refine_best"]
    best = front.best(3.25)
    assert best.equivalent_bits <= 3.25 and best.pairs[2] != trap
    assert score(best) < score(solver_plan) and info["refine_gain"] < 1.0
    assert all(p.equivalent_bits <= 3.25 + 1e-9 for p in measured)
    assert len({str(p.pairs) for p in measured[1:]}) == len(measured) - 1  # no plan measured twice
    assert any(p.source.startswith("refine trial") for p in front.points)
    count = len(measured)
    again = search(table, **kw, study_name="refined", refine=12, refine_width=3)
    assert len(measured) == count and again.best(3.25) == best  # the finished study is read, not rerun
    with pytest.raises(ValueError, match="refine=3 is invalid"):  # nothing to measure the moves with
        search(table, progress=False, refine=3)
