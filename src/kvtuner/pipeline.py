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

UNIFORM = ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))


class OutDirError(PlanError):
    """The output directory holds artefacts of another model or settings."""


@dataclass
class TuneSettings:
    mode: str = "kivi"
    budgets: tuple[float, ...] = (3.25, 4.0)
    sequences: int = 4
    seq_len: int = 512
    kl_seq_len: int = 256
    trials: int = 8
    # measured budget-keeping local-search trials per budget after NSGA-II (search(refine=...))
    refine: int = 0
    eval_prefill: int = 256
    eval_decode: int = 128
    eval_windows: int = 1
    seed: int = 0
    bits: tuple[int, ...] = (8, 4, 2)  # candidate widths for K and V: every (k, v) pair of them
    # Hadamard rotation of quantized K/V: "off", "all" (every quantized tensor, profiled, searched
    # and saved so) or "per_layer" (plain and rotated tables; each layer picks per pair)
    rotation: str = "off"
    # full-precision attention-sink tokens at the start of every quantized tensor (QuantSpec.sink_length):
    # profiled, searched, evaluated and saved with them; 0 is the paper's setting
    sink: int = 0

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
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise PlanError(f"sink={self.sink!r} is invalid; allowed: a non-negative number of tokens")
        for name, least in (("sequences", 1), ("seq_len", 32), ("kl_seq_len", 32), ("eval_prefill", 1),
                            ("eval_decode", 1), ("eval_windows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise PlanError(f"{name.replace('_', '-')}={value!r} is invalid; allowed: a whole number >= {least}")


ROTATIONS = ("off", "all", "per_layer")


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
            "bits": list(settings.bits), "rotation": settings.rotation, "sink": settings.sink}


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
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
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

    # 1. profile (+ one-layer KL costs for the solver)
    table_path = out / "table.json"
    table = _cached_table(table_path, model.config, log)
    if table is not None:
        result.reused.append("table")
    else:
        log(f"profiling {s.sequences} calibration windows of {s.seq_len} tokens")
        table = _profile(model, tokenizer, calibration, s, s.rotation == "all", model_id, progress)
        table.save(table_path)
    result.files.append(table_path)
    rotated = None
    if s.rotation == "per_layer":  # a second table, every quantized tensor rotated
        rotated_path = out / "table-rotated.json"
        rotated = _cached_table(rotated_path, model.config, log)
        if rotated is None:
            log("profiling rotated tensors")
            rotated = _profile(model, tokenizer, calibration, s, True, model_id, progress)
            rotated.save(rotated_path)
        result.files.append(rotated_path)

    # 2. search: solver front for all budgets, then NSGA-II per budget on measured KL (resumable)
    proxy = search(table, mode=s.mode, progress=False, cluster=False, rotated=rotated)
    proxy.save(out / "front.json")
    result.files.append(out / "front.json")
    objective = KLObjective(model, windows, prefill=min(384, s.seq_len // 2), chunk=16) if s.trials else None
    fronts = {}
    for b in s.budgets:
        log(f"searching plans within {b:g} bits")
        fronts[b] = search(table, mode=s.mode, max_bits=b, quality=objective, n_trials=s.trials, storage=storage,
                           study_name=f"{model_id or 'model'}-{s.mode}-{b:g}{_ROT_TAG[s.rotation]}"
                                      + (f"-sink{s.sink}" if s.sink else ""), seed=s.seed,
                           progress=progress, cluster=False, rotated=rotated, refine=s.refine)
        plan = fronts[b].best(b)
        plan = KVPlan(plan.layers, model_id=model_id, model=dims.fingerprint(),
                      provenance={"source": "kvtuner tune", "budget_bits": b, "mode": s.mode, "rotation": s.rotation,
                                  "sink": s.sink, "front_metric": fronts[b].metric, "trials": s.trials,
                                  "refine_trials": fronts[b].info.get("trials_refine", 0)})
        path = plan.save(out / f"plan-{b:g}.json")
        result.plans[b] = path
        result.files.append(path)

    # 3. evaluate chosen plans and uniform baselines on held-out text
    plans = {f"searched <= {b:g}": KVPlan.load(p) for b, p in result.plans.items()}
    plans.update({f"uniform {LayerSpec.pair(k, v).name}": KVPlan.uniform(dims.num_layers, k, v, s.mode,
                                                                         sink_length=s.sink)
                  for k, v in UNIFORM})
    signature = {name: [list(p) for p in plan.pairs] for name, plan in plans.items()}
    quality_path = out / "quality.json"
    cached = _cached_json(quality_path, log)
    if cached and cached.get("signature") == signature and isinstance(cached.get("rows"), list):
        result.quality = cached["rows"]
        result.reused.append("evaluation")
    else:
        log(f"evaluating {len(plans)} plans on held-out text")
        for name, plan in plans.items():
            r = ev(plan).to_dict()
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


_ROT_TAG = {"off": "", "all": "-rot", "per_layer": "-rotchoice"}  # one Optuna study per search space


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


def _profile(model: Any, tokenizer: Any, calibration: str, s: TuneSettings, rotation: bool, model_id: str | None,
             progress: bool):
    """Sensitivity table plus one-layer KL costs, with every quantized tensor rotated or none."""
    from .profiling import calibration_batches, layer_kl, profile

    table = profile(model, tokenizer, calibration, pairs=s.pairs, modes=[s.mode], num_sequences=s.sequences,
                    seq_len=s.seq_len, model_id=model_id, rotation=rotation, sink_length=s.sink, progress=progress)
    kl_batch = calibration_batches(tokenizer, calibration, 1, s.kl_seq_len)
    table.kl = layer_kl(model, kl_batch, s.pairs, [s.mode], rotation=rotation, sink_length=s.sink,
                        progress=progress)
    return table


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
