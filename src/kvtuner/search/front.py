"""``ParetoFront``: the versioned artefact search writes, one plan per point."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..spec import KVPlan, PlanError, _fail, atomic_write_json, check_header, read_json

FRONT_VERSION = 1


@dataclass
class FrontPoint:
    plan: KVPlan
    equivalent_bits: float
    proxy_error: float
    quality: float | None = None  # measured objective (e.g. KL); None for solver-only points
    source: str = "solver"

    @property
    def score(self) -> float:
        return self.proxy_error if self.quality is None else self.quality


@dataclass
class ParetoFront:
    """Non-dominated (equivalent bits, quality) plans, cheapest first."""

    points: list[FrontPoint]
    mode: str
    metric: str  # what ``quality`` measures, e.g. "kl"; "proxy" when only the solver ran
    info: dict[str, Any] = field(default_factory=dict)

    def best(self, max_bits: float) -> KVPlan:
        """The best-quality plan with at most ``max_bits`` equivalent bits."""
        fits = [p for p in self.points if p.equivalent_bits <= max_bits + 1e-9]
        if not fits:
            lo = min(p.equivalent_bits for p in self.points)
            raise PlanError(f"max_bits={max_bits} is below every plan on the front; allowed: >= {lo:.3f}")
        return min(fits, key=lambda p: (p.score, p.equivalent_bits)).plan

    def at(self, budget_bits: float) -> KVPlan:
        return self.best(budget_bits)

    def to_dict(self) -> dict[str, Any]:
        return {"_type": "ParetoFront", "_version": FRONT_VERSION, "mode": self.mode, "metric": self.metric,
                "info": self.info,
                "points": [{"equivalent_bits": p.equivalent_bits, "proxy_error": p.proxy_error, "quality": p.quality,
                            "source": p.source, "plan": p.plan.to_dict()} for p in self.points]}

    @classmethod
    def from_dict(cls, data: Any) -> ParetoFront:
        check_header(data, "ParetoFront", FRONT_VERSION)
        points = data.get("points")
        if not isinstance(points, list) or not points:
            _fail("front.points", points, "a non-empty list")
        out = []
        for i, p in enumerate(points):
            if not isinstance(p, dict) or "plan" not in p:
                _fail(f"front.points[{i}]", p, "an object with a plan")
            out.append(FrontPoint(KVPlan.from_dict(p["plan"]), float(p["equivalent_bits"]), float(p["proxy_error"]),
                                  None if p.get("quality") is None else float(p["quality"]), str(p.get("source"))))
        return cls(out, str(data.get("mode")), str(data.get("metric")), dict(data.get("info") or {}))

    def save(self, path: str | os.PathLike[str]):
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ParetoFront:
        return cls.from_dict(read_json(path))


def pareto_points(points: list[FrontPoint]) -> list[FrontPoint]:
    from .pareto import non_dominated

    keep = non_dominated([(p.equivalent_bits, p.score) for p in points])
    uniq: dict[tuple, FrontPoint] = {}
    for i in keep:
        uniq.setdefault((points[i].equivalent_bits, round(points[i].score, 12)), points[i])
    return sorted(uniq.values(), key=lambda p: p.equivalent_bits)
