"""``kvtuner tune``: profile -> prune -> solve/search -> evaluate -> plans + report, in one call.

Every stage writes its artefact into ``out`` and is reused when the command runs again with the
same ``out`` (the table if it belongs to the same model and settings, the Optuna study through its
storage, the evaluation if the same plans were measured).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec import PLANE_WIDTHS, KVPlan, LayerSpec, ModelDims, PlanError, atomic_write_json

# the uniform plans every report compares with, at the default budgets' ends: KIVI as published (plain
# storage, no sink tokens); each costs as much held-out time as a searched plan
UNIFORM = ((4, 4), (4, 2))


class OutDirError(PlanError):
    """The output directory holds artefacts of another model or settings."""


@dataclass
class TuneSettings:
    """What ``kvtuner tune`` measures and searches. The defaults are the ``recommended`` preset;
    :meth:`preset` gives ``paper`` (the paper's setting) too. ``docs/defaults.md`` has the measurements
    behind each default."""

    mode: str = "kivi"
    budgets: tuple[float, ...] = (3.0, 3.25, 4.0)
    sequences: int = 4
    seq_len: int = 512
    kl_seq_len: int = 512
    # equal-length windows for the one-layer KL costs, measured side by side
    kl_windows: int = 1
    # one-layer KL only for the pairs on each layer's (bits, attention error) Pareto set: the others
    # cannot be chosen by a KL solver that agrees with the error ranking, and cost a forward pass each
    kl_pruned: bool = True
    trials: int = 8
    # measured budget-keeping local-search trials per budget after NSGA-II (search(refine=...))
    refine: int = 0
    eval_prefill: int = 256
    eval_decode: int = 64
    eval_windows: int = 16
    seed: int = 0
    bits: tuple[int, ...] = (8, 4, 3, 2)  # candidate widths for K and V: every (k, v) pair of them
    # Hadamard rotation of quantized K/V: "off", "all" (every quantized tensor, profiled, searched
    # and saved so) or "per_layer" (plain and rotated profiles; each layer keeps, per pair, the storage
    # with the lower measured cost)
    rotation: str = "per_layer"
    # full-precision attention-sink tokens at the start of every quantized tensor (QuantSpec.sink_length)
    sink: int = 1
    # query-aware rounding of quantized keys (kvtuner.rounding): queries' second moments measured on the
    # calibration windows travel in the plans; profiling, KL costs and trials see the same codes
    key_rounding: bool = True
    preset: str = "recommended"

    @classmethod
    def preset_settings(cls, name: str) -> dict[str, Any]:
        """The fields a preset sets (the rest keep their defaults)."""
        key = str(name).strip().lower()
        if key not in PRESETS:
            raise PlanError(f"preset={name!r} is invalid; allowed: {', '.join(PRESETS)}")
        return dict(PRESETS[key], preset=key)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TuneSettings:
        return cls(**{**cls.preset_settings(name), **overrides})

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple((k, v) for k in self.bits for v in self.bits)

    def check(self) -> None:
        self.rotation = _rotation_setting(self.rotation)
        for b in self.budgets:
            if not 2 <= b <= 16:
                raise PlanError(f"budget-bits={b} is invalid; allowed: 2 to 16 equivalent bits")
        for b in self.bits:
            if b not in PLANE_WIDTHS:
                raise PlanError(f"bits={b} is invalid; allowed: 2, 3, 4, 6 or 8")
        for name in ("trials", "refine"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PlanError(f"{name}={value!r} is invalid; allowed: a non-negative number of trials")
        if self.refine and not self.trials:
            raise PlanError(f"refine={self.refine} starts from measured trials; allowed: refine=0, or trials > 0")
        if self.mode not in ("kivi", "per_token"):
            raise PlanError(f"mode={self.mode!r} is invalid; allowed: 'kivi' or 'per_token'")
        if not isinstance(self.key_rounding, bool):
            raise PlanError(f"key_rounding={self.key_rounding!r} is invalid; allowed: true or false")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise PlanError(f"sink={self.sink!r} is invalid; allowed: a non-negative number of tokens")
        for name, least in (("sequences", 1), ("seq_len", 32), ("kl_seq_len", 32), ("kl_windows", 1),
                            ("eval_prefill", 1), ("eval_decode", 1), ("eval_windows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise PlanError(f"{name.replace('_', '-')}={value!r} is invalid; allowed: a whole number >= {least}")


ROTATIONS = ("off", "all", "per_layer")
# the storages each rotation setting profiles (rotated or not), and the files their tables go to, in order
_STORAGES = {"off": (False,), "all": (True,), "per_layer": (False, True)}
_TABLE_FILES = ("table.json", "table-rotated.json")

# the method's settings each preset fixes; "recommended" is TuneSettings' own defaults
PRESETS: dict[str, dict[str, Any]] = {
    "recommended": {},
    # KVTuner as published: key-first pairs from {2, 4, 8}, plain KIVI storage, no sink tokens; one
    # 256-token window of one-layer KL for every (layer, pair) as the solver's cost
    "paper": dict(bits=(8, 4, 2), rotation="off", sink=0, kl_seq_len=256, kl_windows=1, kl_pruned=False,
                  key_rounding=False),
}


def _rotation_setting(value: Any) -> str:
    """``off``/``all``/``per_layer``; booleans (older configs) mean off/all, ``-`` may replace ``_``."""
    if isinstance(value, bool):
        return "all" if value else "off"
    v = str(value).strip().lower().replace("-", "_")
    v = {"true": "all", "on": "all", "false": "off", "none": "off"}.get(v, v)
    if v not in ROTATIONS:
        raise PlanError(f"rotation={value!r} is invalid; allowed: off, all, per-layer")
    return v


@dataclass
class TuneOutput:
    out: Path
    plans: dict[float, Path]
    quality: list[dict[str, Any]]
    reused: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "plans": {str(b): str(p) for b, p in self.plans.items()},
                "quality": self.quality, "reused": self.reused, "files": [str(f) for f in self.files]}


def _key(settings: TuneSettings, text_sha: str, dims: ModelDims) -> dict[str, Any]:
    return {"model": dims.fingerprint(), "mode": settings.mode, "sequences": settings.sequences,
            "seq_len": settings.seq_len, "kl_seq_len": settings.kl_seq_len, "text_sha256": text_sha,
            "bits": list(settings.bits), "rotation": settings.rotation, "sink": settings.sink,
            "kl_windows": settings.kl_windows, "kl_pruned": settings.kl_pruned, "key_rounding": settings.key_rounding}


def run_tune(model: Any, tokenizer: Any, calibration: str, evaluation: str, out: str | os.PathLike[str], *,
             settings: TuneSettings | None = None, model_id: str | None = None, storage: str | None = None,
             progress: bool = True, log=print) -> TuneOutput:
    """Run the whole pipeline on ``model``; see the module docstring."""
    import hashlib

    from .evaluation import Evaluator
    from .profiling import calibration_batches
    from .search import search
    from .search.objectives import KLObjective

    s = settings or TuneSettings()
    s.check()
    out = Path(out)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    dims = ModelDims.from_config(model.config)
    # everything that can fail on the inputs fails here, before the first minute of profiling
    ev = Evaluator(model, tokenizer, evaluation, windows=s.eval_windows, prefill=s.eval_prefill,
                   decode=s.eval_decode, prompts=2, new_tokens=32, passkey_lengths=(), progress=progress)
    windows = calibration_batches(tokenizer, calibration, s.sequences + 2, s.seq_len)[-1:]
    own_study = f"sqlite:///{(out / 'study.db').resolve()}"
    storage = storage or own_study
    if s.trials:
        from .search.optuna_backend import check_storage

        check_storage(storage)
    key = _key(s, hashlib.sha256(calibration.encode()).hexdigest(), dims)
    result = TuneOutput(out, {}, [])
    manifest_path = out / "kvtuner-run.json"
    old = _cached_json(manifest_path, log)
    if old is not None and old.get("model") != key["model"]:
        raise OutDirError(f"--out {out} holds artefacts of another model ({old.get('model')}); allowed: an empty "
                          "directory or one from the same model (use another --out)")
    if manifest_path.exists() and old != key:
        log(f"settings changed since the last run in {out}: profiling again")
        for stale in ("table.json", "table-rotated.json", "quality.json"):
            (out / stale).unlink(missing_ok=True)
    atomic_write_json(manifest_path, key)
    result.files.append(manifest_path)

    # 1. profile (+ one-layer KL costs for the solver)
    rounding = None
    if s.key_rounding:
        from .rounding import query_moments

        rounding = query_moments(model, calibration_batches(tokenizer, calibration, s.sequences, s.seq_len))
    paths = [out / name for name in _TABLE_FILES[:len(_STORAGES[s.rotation])]]
    tables = [_cached_table(p, model.config, log) for p in paths]
    if all(t is not None for t in tables):
        result.reused.append("table")
    else:
        log(f"profiling {s.sequences} calibration windows of {s.seq_len} tokens"
            + (", plain and rotated" if s.rotation == "per_layer" else "")
            + (", query-aware key rounding" if rounding is not None else ""))
        tables = _profile(model, tokenizer, calibration, s, model_id, progress, rounding)
        for t, p in zip(tables, paths):
            t.save(p)
    result.files += paths
    table, rotated = tables[0], (tables[1] if len(tables) > 1 else None)

    # 2. search: solver front for all budgets, then NSGA-II per budget on measured KL (resumable)
    proxy = search(table, mode=s.mode, progress=False, cluster=False, rotated=rotated)
    proxy.save(out / "front.json")
    result.files.append(out / "front.json")
    objective = (KLObjective(model, windows, prefill=min(384, s.seq_len // 2), chunk=16, key_rounding=rounding)
                 if s.trials else None)
    fronts = {}
    # one Optuna study per search space: a rerun with other settings must not continue this one's trials
    space_tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    if s.trials and storage == own_study:
        result.files.append(out / "study.db")
    for b in s.budgets:
        log(f"searching plans within {b:g} bits")
        fronts[b] = search(table, mode=s.mode, max_bits=b, quality=objective, n_trials=s.trials, storage=storage,
                           study_name=f"{model_id or 'model'}-{s.mode}-{b:g}-{space_tag}", seed=s.seed,
                           progress=progress, cluster=False, rotated=rotated, refine=s.refine)
        plan = fronts[b].best(b)
        plan = KVPlan(plan.layers, model_id=model_id, model=dims.fingerprint(), key_rounding=rounding,
                      provenance={"source": "kvtuner tune", "budget_bits": b, "preset": s.preset,
                                  "settings": s.to_dict(), "front_metric": fronts[b].metric,
                                  "refine_trials": fronts[b].info.get("trials_refine", 0)})
        path = plan.save(out / f"plan-{b:g}.json")
        result.plans[b] = path
        result.files.append(path)

    # 3. evaluate chosen plans and uniform baselines on held-out text
    plans = {f"searched <= {b:g}": KVPlan.load(p) for b, p in result.plans.items()}
    plans.update({f"uniform {LayerSpec.pair(k, v).name}": KVPlan.uniform(dims.num_layers, k, v, s.mode)
                  for k, v in UNIFORM})
    signature = {name: [list(p) for p in plan.pairs] for name, plan in plans.items()}
    quality_path = out / "quality.json"
    cached = _cached_json(quality_path, log)
    if cached and cached.get("signature") == signature and isinstance(cached.get("rows"), list):
        result.quality = cached["rows"]
        result.reused.append("evaluation")
    else:
        log(f"evaluating {len(plans)} plans on {s.eval_windows} held-out windows")
        for name, plan in plans.items():
            r = ev(plan, label=name).to_dict()
            r["name"] = name
            r["pairs"] = [list(p) for p in plan.pairs]
            result.quality.append(r)
        atomic_write_json(quality_path, {"signature": signature, "rows": result.quality})
    result.files.append(quality_path)

    # 4. report
    from .report import write_report

    log("writing the report")
    result.files += write_report(out, table, s.mode, proxy, fronts, result.quality, model.config,
                                 model_id=model_id, dtype_bytes=2)  # caches are deployed in fp16/bf16
    return result


def check_out_dir(out: Path) -> None:
    """``--out`` must be a directory this process can create files in (or one it can create)."""
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file; allowed: a directory (new or from an earlier run)")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutDirError(f"--out {out}: {probe} is not writable; allowed: a directory this user can write to")


def _cached_json(path: Path, log) -> Any:
    """A cached artefact's JSON, or ``None`` when it is missing or unreadable as JSON (then recomputed)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log(f"{path} is not valid JSON ({type(e).__name__}): computing it again")
        return None
    except OSError as e:
        raise OutDirError(f"{path} cannot be read ({e.strerror}); allowed: a readable file (or remove it)") from None


def _cached_table(path: Path, config: Any, log):
    """A reusable sensitivity table, or ``None`` (missing, or not a valid table: profiled again)."""
    from .profiling import SensitivityTable

    if not path.exists():
        return None
    if not os.access(path, os.R_OK):
        raise OutDirError(f"{path} cannot be read (permission denied); allowed: a readable file (or remove it)")
    try:
        table = SensitivityTable.load(path, config=config)
    except PlanError as e:
        log(f"{path} is not a usable table ({e}): profiling again")
        return None
    log(f"reusing {path}")
    return table


def _profile(model: Any, tokenizer: Any, calibration: str, s: TuneSettings, model_id: str | None, progress: bool,
             rounding: Any = None):
    """Sensitivity tables (plain, then rotated where ``s.rotation`` asks for both) with one-layer KL
    costs for the solver, measured for the pairs on each layer's attention-error Pareto set."""
    from .profiling import calibration_batches, layer_kl, profile
    from .search import build_space

    variants = _STORAGES[s.rotation]
    tables = [profile(model, tokenizer, calibration, pairs=s.pairs, modes=[s.mode], num_sequences=s.sequences,
                      seq_len=s.seq_len, model_id=model_id, rotation=r, sink_length=s.sink, progress=progress,
                      key_rounding=rounding)
              for r in variants]
    only: list = [None] * len(variants)  # None: every pair in every layer
    if s.kl_pruned:
        space = build_space(tables[0], s.mode, cluster=False, metric="attention",
                            rotated=tables[1] if len(tables) > 1 else None)
        # a rotated option is (k, v, 1); with one table every option is of that table's storage
        only = [[[p[:2] for p in cands if len(tables) == 1 or (len(p) > 2) == r] for cands in space.candidates]
                for r in variants]
    kl_batches = calibration_batches(tokenizer, calibration, s.kl_windows, s.kl_seq_len)
    for table, r, keep in zip(tables, variants, only):
        table.kl = layer_kl(model, kl_batches, s.pairs, [s.mode], rotation=r, sink_length=s.sink,
                            progress=progress, only=keep, key_rounding=rounding)
    return tables


def read_texts(text: str | None) -> tuple[str, str]:
    """``(calibration, evaluation)`` text. ``None``/"pydoc" -> the built-in split; a file -> its text;
    a directory -> its .txt/.md/.rst files. Own text is split 80/20 by characters.
    """
    from .data import default_texts

    if text in (None, "", "pydoc"):
        return default_texts("calibration"), default_texts("evaluation")
    p = Path(text)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md", ".rst") and f.is_file())
        if not files:
            raise FileNotFoundError(f"--text {text}: no .txt/.md/.rst files in the directory; allowed: a text "
                                    "file, a directory of them, or 'pydoc'")
        parts = []
        for f in files:
            try:
                parts.append(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError) as e:
                raise FileNotFoundError(f"--text {text}: {f} is not readable UTF-8 text ({e.__class__.__name__}); "
                                        "allowed: a directory of .txt/.md/.rst text files") from e
        body = "\n\n".join(parts)
    elif p.is_file():
        try:
            body = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            raise FileNotFoundError(f"--text {text} is not readable UTF-8 text ({e.__class__.__name__}); allowed: "
                                    "a text file, a directory of them, or 'pydoc'") from e
    else:
        raise FileNotFoundError(f"--text {text} does not exist; allowed: a text file, a directory of them, or "
                                "'pydoc'")
    cut = int(len(body) * 0.8)
    return body[:cut], body[cut:]


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Options from a TOML or YAML file (keys as the long option names, '-' or '_')."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path} does not exist; allowed: a .toml or .yaml file")
    if p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError as e:
                raise ImportError("TOML configs on Python 3.10 need tomli: pip install tomli") from e

        data = tomllib.loads(p.read_text())
    elif p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError("YAML configs need PyYAML: pip install pyyaml (or use a .toml config)") from e
        data = yaml.safe_load(p.read_text()) or {}
    else:
        raise PlanError(f"--config {path}: suffix {p.suffix!r} is invalid; allowed: .toml, .yaml, .yml")
    if not isinstance(data, dict):
        raise PlanError(f"--config {path} must hold a table of options")
    return {k.replace("-", "_"): v for k, v in data.items()}
