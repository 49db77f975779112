"""NSGA-II over the clustered space with persistent, resumable, multi-worker Optuna storage."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..spec import KVPlan, PlanError
from .front import FrontPoint
from .space import SearchSpace


def _optuna():
    try:
        import optuna
    except ImportError as e:
        raise ImportError("the multi-objective search needs optuna; install the extra: pip install 'kvtuner[tune]'") \
            from e
    return optuna


class StorageError(PlanError):
    """A storage that cannot be opened, in one line that says what to do."""


DRIVERS = {"postgresql": "pip install 'kvtuner[postgres]' (psycopg 3)", "mysql": "pip install pymysql"}


def check_storage(url: str | os.PathLike[str]) -> None:
    """Open ``url`` once, before any work that needs it, and say in one line why it cannot be used."""
    url = str(url)
    path = url.removeprefix("journal:").removeprefix("sqlite:///") if "://" not in url or url.startswith(
        "sqlite:///") else None
    if path and Path(path).is_dir():
        raise StorageError(f"--storage {url} is a directory; allowed: a .db/.journal/.log file path or a database URL")
    try:
        open_storage(url)
    except ImportError as e:
        scheme = url.split("://")[0].split("+")[0]
        fix = DRIVERS.get(scheme, "install the SQLAlchemy driver for this database")
        raise StorageError(f"--storage {url}: the database driver is missing; fix: {fix}") from e
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's and the drivers' errors, mapped to one line
        name = type(e).__name__
        first = str(e).strip().splitlines()[0] if str(e).strip() else name
        if name == "NoSuchModuleError":
            raise StorageError(f"--storage {url}: unknown database scheme; allowed: sqlite:///PATH, "
                               "postgresql://USER@HOST/DB, mysql://USER@HOST/DB, or a .db/.journal/.log path") from e
        if "file is not a database" in first or name == "DatabaseError":
            raise StorageError(f"--storage {url}: not an Optuna database ({first}); fix: move it away (a rerun "
                               "then starts a new study) or pass another --storage") from e
        raise StorageError(f"--storage {url} cannot be opened: {first}") from e


def open_storage(url: str | os.PathLike[str]):
    """An Optuna storage from a URL or path.

    * ``sqlite:///x.db``, ``postgresql://...``, ``mysql://...``: RDB storage with heartbeats, so a
      trial whose worker died is marked failed and its parameters are retried once.
    * a path ending in ``.log`` or ``.journal`` (or ``journal:PATH``): a journal file.
    * a path ending in ``.db``: a local SQLite file.
    """
    optuna = _optuna()
    url = str(url)
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    if "://" not in url:
        url = f"sqlite:///{Path(url).resolve()}"
    import warnings

    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    engine = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite")
              else {"connect_args": {"connect_timeout": 10}} if url.startswith(("postgresql", "mysql")) else {})
    with warnings.catch_warnings():  # heartbeats and their retry callback are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        kwargs = ({"heartbeat_stale_trial_callback": retry(max_retry=1)} if retry is not None  # optuna >= 4.9
                  else {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)})
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, heartbeat_interval=5, grace_period=15, engine_kwargs=engine,
                                                  **kwargs)
            except Exception as e:  # workers starting together race to create the schema; the loser retries
                if attempt == 4 or "already exists" not in str(e) and "UniqueViolation" not in str(e):
                    raise
                import time

                time.sleep(0.5 * (attempt + 1))


def run_study(space: SearchSpace, quality: Callable[[KVPlan], float], *, max_bits: float, n_trials: int,
              storage: str | os.PathLike[str], study_name: str, seed: int = 0, warm_start: int = 12,
              population_size: int = 20, progress: bool = True, refine: int = 0,
              refine_width: int = 4) -> tuple[list[FrontPoint], dict[str, Any]]:
    """Run (or continue) a study until it holds ``n_trials`` completed NSGA-II trials, then up to
    ``refine`` measured local-search trials (:func:`refine_study`); return its points.

    Workers pointed at the same storage and study name share the work. Identical parameter sets
    are measured once: a repeat reuses the stored values.
    """
    optuna = _optuna()
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def constraints(trial):
        return [trial.user_attrs.get("bits", 99.0) - max_bits]

    # optuna 5 deprecates constraints_func (removal in 7) for Trial.set_constraint; key "0" is where the
    # old list format put the one constraint, so studies begun either way read the same
    per_trial = hasattr(optuna.trial.Trial, "set_constraint")
    sampler = optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed,
                                            **({} if per_trial else {"constraints_func": constraints}))
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage), sampler=sampler,
                                directions=["minimize", "minimize"], load_if_exists=True)
    names = [f"group{g}" for g in range(len(space.groups))]
    if not study.trials and warm_start:
        feasible = [c for bits, _, c in space.solver_frontier() if bits <= max_bits]
        step = max(1, len(feasible) // warm_start)
        seeds = feasible[::-1][::step][:warm_start]  # the best within budget first, then cheaper ones
        # uniform plans within the budget too, so the measured front is never worse than them
        for pair in sorted({p for c in space.candidates for p in c}, key=lambda p: -(p[0] + p[1])):
            if (pair[0] + pair[1]) / 2 <= max_bits and all(pair in space.group_candidates(g)
                                                           for g in range(len(space.groups))):
                seeds.insert(1, [space.group_candidates(g).index(pair) for g in range(len(space.groups))])
        for choice in seeds:
            study.enqueue_trial(dict(zip(names, choice)), skip_if_exists=True)

    def objective(trial):
        choice = [trial.suggest_int(name, 0, len(space.group_candidates(g)) - 1) for g, name in enumerate(names)]
        plan = space.plan(choice)
        trial.set_user_attr("bits", plan.equivalent_bits)
        if per_trial:
            trial.set_constraint("0", plan.equivalent_bits - max_bits)
        trial.set_user_attr("proxy_error", space.proxy_error(choice))
        for done in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if done.params == trial.params:
                trial.set_user_attr("cached_from", done.number)
                return tuple(done.values)
        if plan.equivalent_bits > max_bits + 1e-9:
            # constrained NSGA-II ranks infeasible trials by their violation alone, so measuring one
            # would only spend time: its proxy error stands in, and it never enters the front
            trial.set_user_attr("measured", False)
            return space.proxy_error(choice), plan.equivalent_bits
        return quality(plan), plan.equivalent_bits

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    refined = sum(1 for t in complete if "refine_from" in t.user_attrs)
    remaining = max(0, n_trials - (len(complete) - refined))
    if remaining:
        from tqdm.auto import tqdm

        # optuna's own bar has no label; several budgets' searches must be told apart
        bar = tqdm(total=remaining, desc=f"NSGA-II trials <= {max_bits:g} bits", disable=not progress, unit="trial")
        try:
            study.optimize(objective, n_trials=remaining, show_progress_bar=False,
                           callbacks=[MaxTrialsCallback(n_trials + refined, states=(TrialState.COMPLETE,)),
                                      lambda _study, _trial: bar.update(1)])
        finally:
            bar.close()
    refine_info = refine_study(study, space, quality, names, max_bits=max_bits, budget=refine, width=refine_width,
                               progress=progress) if refine else {}
    points = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("bits", 99) <= max_bits + 1e-9:
            choice = [t.params[n] for n in names]
            kind = "refine trial" if "refine_from" in t.user_attrs else "trial"
            points.append(FrontPoint(space.plan(choice, {"trial": t.number}), t.values[1], t.user_attrs["proxy_error"],
                                     t.values[0], f"{kind} {t.number}"))
    info = {"study_name": study_name, "trials_complete": len(study.get_trials(states=(TrialState.COMPLETE,))),
            "trials_cached": sum(1 for t in study.trials if "cached_from" in t.user_attrs),
            "trials_over_budget": sum(1 for t in study.trials if t.user_attrs.get("measured") is False),
            "sampler": "NSGAIISampler", "seed": seed, "population_size": population_size, **refine_info}
    return points, info


def _measured(study, names: list[str], max_bits: float) -> dict[tuple[int, ...], float]:
    """Measured objective of every distinct plan within the budget."""
    from optuna.trial import TrialState

    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("bits", 99.0) <= max_bits + 1e-9 and t.user_attrs.get("measured") is not False:
            out.setdefault(tuple(t.params[n] for n in names), t.values[0])
    return out


def refine_study(study, space: SearchSpace, quality: Callable[[KVPlan], float], names: list[str], *,
                 max_bits: float, budget: int, width: int = 4, progress: bool = True) -> dict[str, Any]:
    """Local search from the best measured plan within ``max_bits``, until the study holds ``budget``
    refine trials.

    Each round measures the next ``width`` unmeasured :func:`~kvtuner.search.refine.budget_moves` of the
    current best (best proxy change first); a better measured plan becomes the new centre. Every
    measurement is stored as a completed trial of the same study (user attribute ``refine_from``), so a
    rerun resumes where it stopped, other workers read it, and NSGA-II sees it when the study is
    continued. It stops early when every move of the centre has been measured (a local optimum).
    """
    import inspect

    from tqdm.auto import tqdm

    optuna = _optuna()
    from .refine import budget_moves

    def spent() -> int:
        return sum(1 for t in study.get_trials(deepcopy=False) if "refine_from" in t.user_attrs)

    measured = _measured(study, names, max_bits)
    if not measured:
        return {"trials_refine": 0, "refine_note": "no measured plan within the budget to start from"}
    dists = {n: optuna.distributions.IntDistribution(0, len(space.group_candidates(g)) - 1)
             for g, n in enumerate(names)}
    per_trial = "constraints" in inspect.signature(optuna.trial.create_trial).parameters
    start = best = min(measured, key=measured.get)
    bar = tqdm(total=budget, initial=min(budget, spent()), desc=f"refine <= {max_bits:g} bits", disable=not progress)
    while spent() < budget:
        batch = [tuple(c) for _, c in budget_moves(space, list(best), max_bits) if tuple(c) not in measured]
        if not batch:
            break
        for choice in batch[:min(width, budget - spent())]:
            plan = space.plan(list(choice))
            bits, violation = plan.equivalent_bits, plan.equivalent_bits - max_bits
            # the budget constraint as the sampler stores it: optuna 5 per trial, before it constraints_func's list
            constraint = {"constraints": {"0": violation}} if per_trial else {"system_attrs": {"constraints": [violation]}}
            study.add_trial(optuna.trial.create_trial(
                params=dict(zip(names, choice)), distributions=dists, values=[quality(plan), bits],
                user_attrs={"bits": bits, "proxy_error": space.proxy_error(list(choice)), "refine_from": list(best)},
                **constraint))
            bar.update()
        measured = _measured(study, names, max_bits)
        best = min(measured, key=measured.get)
    bar.close()
    return {"trials_refine": spent(), "refine_start": list(start), "refine_best": list(best),
            "refine_gain": measured[best] / measured[start] if measured[start] else 1.0}
