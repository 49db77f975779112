"""The ``kvtuner`` command line. Heavy imports (torch, transformers) happen inside commands, so
``kvtuner --help`` stays instant."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Layer-wise mixed-precision KV cache quantization for transformers models.")
_state = {"debug": False, "stage": "", "resume": "", "interrupted": False}


class CLIError(Exception):
    """A user error: printed as one red line, no traceback (unless --debug)."""


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.", metavar=FLAG)] = False) -> None:
    _state["debug"] = debug


ModeOpt = Annotated[str, typer.Option(help="Quantization mode: 'kivi' or 'per_token'.", metavar="KIND")]
# typer prints a flag's type ("<bool>") where it has no metavar: flags get an empty one
FLAG = ""


def tune_defaults(preset: str = "recommended") -> dict:
    """``kvtuner tune``'s defaults: the preset's ``TuneSettings``, plus what only the command line has."""
    from ..pipeline import TuneSettings

    s = TuneSettings.from_preset(preset)
    return dict(model="smollm2", text="pydoc", out="kvtuner-out", storage="", device="cpu", preset=s.preset,
                budget_bits=list(s.budgets), mode=s.mode, trials=s.trials, refine=s.refine, seed=s.seed,
                sequences=s.sequences, seq_len=s.seq_len, kl_tokens=s.kl_seq_len, kl_windows=s.kl_windows,
                eval_windows=s.eval_windows, eval_prefill=s.eval_prefill, eval_decode=s.eval_decode,
                bits=",".join(str(b) for b in sorted(s.bits)), rotation=s.rotation.replace("_", "-"), sink=s.sink,
                key_rounding=s.key_rounding)


def _int_option(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--{name.replace('_', '-')}={value!r} is invalid; allowed: a whole number") from e


def _bits(value) -> tuple[int, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return tuple(sorted({int(str(b).strip()) for b in items}, reverse=True))
    except ValueError as e:
        raise CLIError(f"--bits={value!r} is invalid; allowed: comma-separated widths from 2, 3, 4, 6, 8") from e


def _default(name: str) -> str:
    """The help text's default: the recommended preset's, and the paper preset's where it differs."""
    rec = tune_defaults()[name]
    paper = rec if name == "preset" else tune_defaults("paper")[name]
    show = (lambda v: ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, list)
            else (v if v != "" else "none"))
    # parentheses: rich, which typer prints help with, takes square brackets for markup and drops them
    return f" (default: {show(rec)}" + (f"; paper preset: {show(paper)})" if paper != rec else ")")


def _opt(help: str, name: str, metavar: str, *decls: str):
    return typer.Option(*decls, help=help + _default(name), metavar=metavar, show_default=False)


@app.command(epilog="Examples:\n\n  kvtuner tune\n\n  kvtuner tune --preset paper --out runs/paper\n\n"
                    "  kvtuner tune --model smollm2 --budget-bits 3.25 --out runs/smollm2\n\n"
                    "  kvtuner tune --config tune.toml --json")
def tune(preset: Annotated[str | None, _opt(
             "Settings to start from: 'recommended' (measured best: 2/3/4/8-bit pairs, rotation per layer, one "
             "sink token, query-aware key rounding, 512-token KL costs) or 'paper' (KVTuner as published). Other "
             "options override it.",
             "preset", "NAME")] = None,
         model: Annotated[str | None, _opt("'smollm2' (built in), a hub id, a directory or .gguf.", "model",
                                           "NAME_OR_PATH")] = None,
         text: Annotated[str | None, _opt("Calibration/evaluation text: a file, a directory, or 'pydoc'.", "text",
                                          "SOURCE")] = None,
         budget_bits: Annotated[list[float] | None, _opt("Equivalent-bit budget, one plan each (repeatable).",
                                                         "budget_bits", "BITS")] = None,
         mode: Annotated[str | None, _opt("'kivi' or 'per_token'.", "mode", "KIND")] = None,
         out: Annotated[str | None, _opt("Output directory (reused on reruns).", "out", "DIR", "--out", "-o")] = None,
         storage: Annotated[str | None, typer.Option(help="Optuna storage URL/path. (default: OUT/study.db)",
                                                     metavar="URL", show_default=False)] = None,
         trials: Annotated[int | None, _opt("NSGA-II trials per budget (0 = solver only).", "trials", "N")] = None,
         refine: Annotated[int | None, _opt(
             "Measured local-search trials per budget after NSGA-II: single- and paired-layer moves that keep the "
             "budget, best proxy first (0: none).", "refine", "N")] = None,
         seed: Annotated[int | None, _opt("Sampler seed.", "seed", "N")] = None,
         device: Annotated[str | None, _opt("'cpu', 'cuda' or 'cuda:N'.", "device", "WHERE")] = None,
         device_map: Annotated[str | None, typer.Option(
             help="accelerate's weight placement for a model larger than one GPU: 'auto' spreads it over the "
                  "visible GPUs, then CPU memory (--device is then where inputs start).", metavar="MAP",
             show_default=False)] = None,
         sequences: Annotated[int | None, _opt("Calibration windows to profile.", "sequences", "N")] = None,
         seq_len: Annotated[int | None, _opt("Tokens per calibration window.", "seq_len", "N")] = None,
         kl_tokens: Annotated[int | None, _opt("Tokens per window of the one-layer KL costs.", "kl_tokens",
                                               "N")] = None,
         kl_windows: Annotated[int | None, _opt("Windows of the one-layer KL costs.", "kl_windows", "N")] = None,
         eval_windows: Annotated[int | None, _opt(
             "Held-out windows (>= 2 gives the report's intervals).", "eval_windows", "N")] = None,
         eval_prefill: Annotated[int | None, _opt("Held-out prefill tokens per window.", "eval_prefill", "N")] = None,
         eval_decode: Annotated[int | None, _opt("Held-out teacher-forced decode steps per window.", "eval_decode",
                                                 "N")] = None,
         bits: Annotated[str | None, _opt("Candidate bit widths for K and V.", "bits", "LIST")] = None,
         rotation: Annotated[str | None, _opt(
             "Hadamard rotation of quantized K/V: 'off', 'all' (every quantized tensor) or 'per-layer' (profile "
             "both; each layer keeps plain or rotated storage per pair, whichever measured better).", "rotation",
             "WHICH")] = None,
         sink: Annotated[int | None, _opt(
             "Full-precision attention-sink tokens at the start of every quantized tensor.", "sink", "N")] = None,
         key_rounding: Annotated[bool | None, typer.Option(
             "--key-rounding/--no-key-rounding", help="Query-aware rounding of quantized keys: codes chosen for the "
             "queries' measured second moments instead of the nearest ones (same bytes, same kernels)."
             + _default("key_rounding"), metavar=FLAG, show_default=False)] = None,
         config: Annotated[Path | None, typer.Option(help="TOML/YAML file of these options; flags override it.",
                                                     metavar="FILE")] = None,
         json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary.", metavar=FLAG)] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.", metavar=FLAG)] = False) -> None:
    """Profile, search and evaluate a model; write sensitivity tables, front, plans and the report into --out."""
    import json

    from ..pipeline import TuneSettings, load_config_file, read_texts, run_tune
    from ..spec import PlanError

    given = dict(preset=preset, model=model, text=text, budget_bits=budget_bits, mode=mode, out=out,
                 storage=storage, trials=trials, refine=refine, seed=seed, device=device, sequences=sequences,
                 seq_len=seq_len, kl_tokens=kl_tokens, kl_windows=kl_windows, eval_windows=eval_windows,
                 eval_prefill=eval_prefill, eval_decode=eval_decode, bits=bits, rotation=rotation, sink=sink,
                 key_rounding=key_rounding)
    file_opts = load_config_file(config) if config else {}
    unknown = set(file_opts) - set(tune_defaults())
    if unknown:
        raise CLIError(f"--config {config}: unknown option(s) {sorted(unknown)}; allowed: {sorted(tune_defaults())}")
    chosen = preset if preset is not None else file_opts.get("preset", "recommended")
    try:
        defaults = tune_defaults(chosen)
    except PlanError as e:  # an unknown preset: one line, before anything loads
        raise CLIError(str(e)) from None
    o = {k: (v if v not in (None, []) else file_opts.get(k, defaults[k])) for k, v in given.items()}
    budgets = o["budget_bits"] if isinstance(o["budget_bits"], list) else [o["budget_bits"]]
    try:
        budgets = tuple(sorted({float(b) for b in budgets}))
    except (TypeError, ValueError) as e:
        raise CLIError(f"--budget-bits={o['budget_bits']!r} is invalid; allowed: numbers from 2 to 16") from e
    ints = {k: _int_option(k, o[k]) for k in ("trials", "refine", "seed", "sequences", "seq_len", "kl_tokens",
                                              "kl_windows", "eval_windows", "eval_prefill", "eval_decode", "sink")}
    settings = TuneSettings.from_preset(
        chosen, mode=o["mode"], budgets=budgets, sequences=ints["sequences"], seq_len=ints["seq_len"],
        kl_seq_len=ints["kl_tokens"], kl_windows=ints["kl_windows"], trials=ints["trials"], refine=ints["refine"],
        seed=ints["seed"], eval_windows=ints["eval_windows"], eval_prefill=ints["eval_prefill"],
        eval_decode=ints["eval_decode"], bits=_bits(o["bits"]), rotation=o["rotation"], sink=ints["sink"],
        key_rounding=o["key_rounding"])
    settings.check()  # before the model loads: a bad budget fails in a second
    dev = _device(o["device"])
    from ..pipeline import check_out_dir

    check_out_dir(Path(o["out"]))
    _state["resume"] = f"rerun the same command (same --out {o['out']}) to resume"
    import importlib

    for module, extra in (("optuna", "tune"), ("matplotlib", "tune")):
        if module == "optuna" and not settings.trials:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise CLIError(f"kvtuner tune needs {module}, which is missing; fix: pip install 'kvtuner[{extra}]'") from e
    calibration, evaluation = read_texts(o["text"])
    echo = (lambda *a, **k: None) if quiet or json_out else (lambda msg: typer.echo(msg, err=True))

    def log(msg: str) -> None:
        _stage(msg)
        echo(msg)

    from ..models import load_model

    log(f"loading {o['model']} ...")
    m, tok = load_model(o["model"], device=dev, device_map=device_map or None)
    if device_map:
        placed = sorted({str(d) for d in getattr(m, "hf_device_map", {}).values()})
        log(f"weights placed by accelerate (device_map={device_map}): {', '.join(placed) or 'one device'}")
    if _on_gpu(dev, device_map):
        import torch

        torch.cuda.reset_peak_memory_stats()
    result = run_tune(m, tok, calibration, evaluation, o["out"], settings=settings, model_id=o["model"],
                      storage=o["storage"] or None, progress=not (quiet or json_out), log=log)
    if _on_gpu(dev, device_map):
        import torch

        peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        log(f"peak GPU memory: {peak / 2**30:.1f} GiB (the most on one GPU)")
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=1, default=float))
        return
    if not quiet:
        from ..report import quality_lines

        typer.echo("")
        for line in quality_lines(result.quality):
            typer.echo(line)
        reused = f" (reused: {', '.join(result.reused)})" if result.reused else ""
        typer.echo(f"\nwrote {len(result.files)} files to {result.out}{reused}: plans "
                   f"{', '.join(p.name for p in result.plans.values())}, report.html (open it), report.md")


@app.command(epilog="Examples:\n\n  kvtuner show kvtuner-out/plan-3.25.json")
def show(plan: Annotated[Path, typer.Argument(help="A plan file.", metavar="FILE")]) -> None:
    """Print a plan's per-layer table and its memory per token."""
    from ..spec import KVPlan, ModelDims

    p = KVPlan.load(plan)
    dims = ModelDims(**{**p.model, "layer_types": ("full_attention",) * p.num_layers}) if p.model else None
    typer.echo(f"{plan}: model {p.model_id or '?'}")
    typer.echo(p.describe(dims))


DEFAULT_PLAN = Path("kvtuner-out/plan-3.25.json")  # what `kvtuner tune` writes by default
_EVAL = {k: v for k, v in tune_defaults().items() if k.startswith("eval_")}  # one held-out protocol
PlanOpt = Annotated[Path, typer.Option(help="Plan file (from `kvtuner tune`).", metavar="FILE")]
# a metavar that equals the option's name in capitals becomes the option's name in some click versions
ModelOpt = Annotated[str, typer.Option(help="'smollm2' (built in), a hub id, a model directory or a .gguf file.",
                                       metavar="NAME_OR_PATH")]
DeviceOpt = Annotated[str, typer.Option(help="'cpu', 'cuda' or 'cuda:N'.", metavar="WHERE")]


def _plan_file(plan: Path):
    """Load a plan before any model loads, so a missing or broken file fails in a second."""
    from ..spec import KVPlan

    if not Path(plan).exists():
        hint = " (run `kvtuner tune` first)" if Path(plan) == DEFAULT_PLAN else ""
        raise CLIError(f"--plan {plan} does not exist{hint}; allowed: a plan file from `kvtuner tune`")
    return KVPlan.load(plan)


@app.command(epilog="Examples:\n\n  kvtuner evaluate\n\n  kvtuner evaluate --plan kvtuner-out/plan-3.0.json "
                    "--model smollm2 --windows 8")
def evaluate(plan: PlanOpt = DEFAULT_PLAN, model: ModelOpt = "smollm2",
             text: Annotated[str, typer.Option(help="Text: a file, a directory, or 'pydoc' (its held-out part is "
                                                    "used, as in `kvtuner tune`).", metavar="SOURCE")] = "pydoc",
             windows: Annotated[int, typer.Option(help="Held-out windows (as `kvtuner tune`).",
                                                  metavar="N")] = _EVAL["eval_windows"],
             prefill: Annotated[int, typer.Option(help="Prefill tokens per window.", metavar="N")] = _EVAL["eval_prefill"],
             decode: Annotated[int, typer.Option(help="Teacher-forced decode steps per window.",
                                                 metavar="N")] = _EVAL["eval_decode"],
             device: DeviceOpt = "cpu",
             quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.", metavar=FLAG)] = False) -> None:
    """Held-out quality of a plan and of uniform KV4, with the protocol of `kvtuner tune`'s report."""
    from ..evaluation import Evaluator
    from ..models import load_model
    from ..pipeline import read_texts
    from ..report import REFERENCE, quality_lines
    from ..spec import KVPlan

    _plan_file(plan)
    dev = _device(device)
    _, held_out = read_texts(text)
    _state["resume"] = "nothing to resume (evaluate keeps no state)"
    _stage("loading the model")
    m, tok = load_model(model, device=dev)
    p = KVPlan.load(plan, config=m.config)
    ev = Evaluator(m, tok, held_out, windows=windows, prefill=prefill, decode=decode, prompts=2, new_tokens=32,
                   passkey_lengths=(), progress=not quiet)
    rows = []
    for name, candidate in ((str(plan), p), (REFERENCE, KVPlan.uniform(p.num_layers, 4, 4, "kivi"))):
        _stage(f"evaluating {name}")
        r = ev(candidate, label=name).to_dict()
        r["name"] = name
        rows.append(r)
    typer.echo(f"full precision PPL {rows[0]['full_ppl']:.3f} on {windows} held-out windows")
    for line in quality_lines(rows):
        typer.echo(line)


@app.command(epilog="Examples:\n\n  kvtuner profile -o smollm2.kvtable.json\n\n"
                    "  kvtuner profile --model smollm2 --mode kivi --sequences 4")
def profile(model: ModelOpt = "smollm2",
            mode: Annotated[list[str], typer.Option(help="Modes to profile (repeatable).", metavar="KIND")] = [
                "kivi", "per_token"],
            sequences: Annotated[int, typer.Option(help="Calibration windows.", metavar="N")] = 8,
            seq_len: Annotated[int, typer.Option(help="Tokens per window.", metavar="N")] = 512,
            output: Annotated[Path, typer.Option("--output", "-o", help="Table file to write.", metavar="FILE")] = Path(
                "smollm2.kvtable.json")) -> None:
    """Measure every layer's attention-output error for each (K, V) bit pair on calibration text."""
    from ..data import default_texts
    from ..models import load_model
    from ..profiling import profile as run_profile

    m, tok = load_model(model)
    table = run_profile(m, tok, default_texts("calibration"), modes=mode, num_sequences=sequences, seq_len=seq_len,
                        model_id=model)
    typer.echo(f"wrote {table.save(output)}: {table.num_layers} layers, {len(table.pairs)} pairs, modes "
               f"{', '.join(table.modes)}, {table.num_tokens} tokens")


@app.command(epilog="Examples:\n\n  kvtuner search smollm2.kvtable.json --budget-bits 3.25 -o front.json\n\n"
                    "  kvtuner search smollm2.kvtable.json --budget-bits 4 --storage postgresql://u:p@host/db")
def search(table: Annotated[Path, typer.Argument(help="A sensitivity table from `kvtuner profile`.", metavar="FILE")],
           budget_bits: Annotated[float, typer.Option(help="Maximum equivalent bits.", metavar="BITS")] = 4.0,
           mode: ModeOpt = "kivi",
           model: Annotated[str, typer.Option(help="Model for measured trials (as in `tune`).",
                                              metavar="NAME_OR_PATH")] = "smollm2",
           trials: Annotated[int, typer.Option(help="Completed NSGA-II trials; 0 = solver only.", metavar="N")] = 24,
           refine: Annotated[int, typer.Option(help="Measured local-search trials after NSGA-II (needs trials).",
                                               metavar="N")] = 0,
           storage: Annotated[str, typer.Option(help="Optuna storage: a .db/.journal path or an RDB URL.",
                                                metavar="URL")] = "",
           study: Annotated[str, typer.Option(help="Study name shared by workers.", metavar="NAME")] = "",
           output: Annotated[Path, typer.Option("--output", "-o", help="Front file to write.", metavar="FILE")] = Path(
               "front.json")) -> None:
    """Search per-layer pairs: prune, cluster, solve, then NSGA-II on measured KL (resumable)."""
    from ..profiling import SensitivityTable
    from ..search import search as run_search

    if not 2 <= budget_bits <= 16:
        raise CLIError(f"--budget-bits={budget_bits} is invalid; allowed: 2..16")
    if refine < 0 or (refine and trials <= 0):
        raise CLIError(f"--refine={refine} is invalid; allowed: 0, or a positive count with --trials > 0")
    tab = SensitivityTable.load(table)
    quality = None
    if storage and trials > 0:
        from ..search.optuna_backend import check_storage

        check_storage(storage)
    _state["resume"] = ("rerun the same command (same --storage and study) to resume" if storage else
                        "pass --storage to make a search resumable")
    if trials > 0:
        from ..data import default_texts
        from ..models import load_model
        from ..profiling import calibration_batches
        from ..search.objectives import KLObjective

        m, tok = load_model(model)
        tab.check_config(m.config)
        quality = KLObjective(m, calibration_batches(tok, default_texts("calibration"), 10, 640)[-2:])
    _stage(f"searching plans within {budget_bits:g} bits")
    typer.echo(f"searching plans within {budget_bits:g} bits ...", err=True)
    front = run_search(tab, mode=mode, max_bits=budget_bits, quality=quality, n_trials=trials,
                       storage=storage or None, study_name=study or None, refine=refine)
    front.save(output)
    plan = front.best(budget_bits)
    typer.echo(f"wrote {output}: {len(front.points)} points ({front.metric}); best within {budget_bits} bits: "
               f"{plan.equivalent_bits:.2f} bits, pairs {plan.pairs}")


@app.command(epilog="Examples:\n\n  kvtuner generate --prompt 'The with statement'\n\n"
                    "  kvtuner generate --plan kvtuner-out/plan-3.0.json --sample --device cuda")
def generate(plan: PlanOpt = DEFAULT_PLAN,
             prompt: Annotated[str, typer.Option(help="Prompt text.", metavar="TEXT")] = "The with statement",
             model: ModelOpt = "smollm2",
             max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.", metavar="N")] = 64,
             sample: Annotated[bool, typer.Option("--sample/--greedy", metavar=FLAG, help="Sample (temperature 0.7, top-p 0.9) "
                                                  "instead of greedy decoding.")] = False,
             seed: Annotated[int, typer.Option(help="Sampling seed (the same for both caches).", metavar="N")] = 0,
             compare: Annotated[bool, typer.Option("--compare/--no-compare", metavar=FLAG, help="Also generate with a "
                                                   "full-precision cache, to tell the model's text from the "
                                                   "quantization's.")] = True,
             device: DeviceOpt = "cpu") -> None:
    """Generate from a prompt with a plan's cache (and, to compare, a full-precision one); print both."""
    import torch

    from ..cache import MixedPrecisionCache
    from ..generation import generate as graph_generate
    from ..models import load_model, with_cache
    from ..spec import KVPlan

    _plan_file(plan)
    dev = _device(device)
    _state["resume"] = "nothing to resume (generate keeps no state)"
    _stage("loading the model")
    m, tok = load_model(model, device=dev)
    p = KVPlan.load(plan, config=m.config)
    ids = tok(prompt, return_tensors="pt").to(dev)
    args = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    if sample:
        args.update(temperature=0.7, top_p=0.9)
    typer.echo(f"prompt: {prompt}")
    from transformers import DynamicCache

    runs = [(f"plan ({p.equivalent_bits:.2f} bits)", MixedPrecisionCache(p, m.config))]
    if compare:
        runs.append(("full precision", DynamicCache(config=m.config)))
    for name, cache in runs:
        _stage(f"generating with {name}")
        torch.manual_seed(seed)
        with torch.no_grad():
            if dev.startswith("cuda") and isinstance(cache, MixedPrecisionCache):
                out = graph_generate(m, ids.input_ids, cache, attention_mask=ids.attention_mask, **args)
            else:
                out = m.generate(**ids, **with_cache(m, cache), **args)
        typer.echo(f"\n{name}:\n{tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)}")
        if isinstance(cache, MixedPrecisionCache):
            n = cache.get_seq_length()
            full = KVPlan.uniform(p.num_layers, 16, 16).expected_nbytes(m.config, n,
                                                                        dtype_bytes=torch.finfo(m.dtype).bits // 8)
            typer.echo(f"[cache: {n} tokens, {cache.nbytes()} bytes; a full-precision cache holds {full}]", err=True)


@app.command(epilog="Examples:\n\n  kvtuner bench --plan kvtuner-out/plan-3.25.json --tokens 256")
def bench(plan: PlanOpt = DEFAULT_PLAN, model: ModelOpt = "smollm2",
          tokens: Annotated[int, typer.Option(help="Prompt tokens before decoding.", metavar="N")] = 256,
          steps: Annotated[int, typer.Option(help="Decode steps to time.", metavar="N")] = 32,
          device: DeviceOpt = "cpu") -> None:
    """Quick memory and decode-speed run of a plan against a full-precision cache on this device."""
    import time

    import torch
    from transformers import DynamicCache

    from ..cache import MixedPrecisionCache
    from ..models import load_model, with_cache
    from ..spec import KVPlan

    device = _device(device)
    _plan_file(plan)
    _state["resume"] = "nothing to resume (bench keeps no state)"
    _stage("loading the model")
    m, _ = load_model(model, device=device)
    p = KVPlan.load(plan, config=m.config)
    ids = torch.randint(3, m.config.vocab_size, (1, tokens), device=device)
    for name, make in (("full precision", lambda: DynamicCache(config=m.config)),
                       (f"plan {p.equivalent_bits:.2f} bits", lambda: MixedPrecisionCache(p, m.config))):
        cache = make()
        _stage(f"timing {name}")
        typer.echo(f"timing {name} ...", err=True)
        with torch.no_grad():
            logits = m(ids, **with_cache(m, cache)).logits[:, -1:]
            t0 = time.perf_counter()
            for _ in range(steps):
                logits = m(logits.argmax(-1), **with_cache(m, cache)).logits
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / steps
        nbytes = cache.nbytes() if hasattr(cache, "nbytes") else sum(
            t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        typer.echo(f"{name:<22} {1e3 * dt:8.2f} ms/token  cache {nbytes / 2**20:8.2f} MiB at {tokens + steps} tokens")


def _on_gpu(device: str, device_map: str | None) -> bool:
    import torch

    return torch.cuda.is_available() and (device.startswith("cuda") or bool(device_map))


def _stage(msg: str) -> None:
    """Remember where the command is (an interrupt names it); a swallowed Ctrl-C stops here."""
    _state["stage"] = msg
    if _state["interrupted"]:
        raise KeyboardInterrupt


def _device(value: str) -> str:
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise CLIError(f"--device={value!r} is invalid; allowed: cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device={value!r} is invalid; allowed: cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device={value!r}: no CUDA GPU is visible here; allowed: cpu")
    return str(dev)


def _on_sigint(signum, frame) -> None:
    if not _state["interrupted"]:
        _state["interrupted"] = True  # kept even where a library swallows the exception below
        # a library that swallows it (an exception in a finalizer or callback is only printed) must not keep the
        # run going: whatever still runs 10 s later is stopped; finished work is already stored
        import threading

        watchdog = threading.Timer(10.0, _interrupted, kwargs={"hard": True})
        watchdog.daemon = True
        watchdog.start()
    raise KeyboardInterrupt


class _DropInterruptTracebacks:
    """Optuna logs a trial that a Ctrl-C stopped as a failure with its traceback: one line says it instead."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, KeyboardInterrupt)


def _interrupted(hard: bool = False) -> None:
    where = f" while {_state['stage'].rstrip(' .')}" if _state["stage"] else ""
    resume = f"; {_state['resume']}" if _state["resume"] else ""
    typer.secho(f"interrupted{where}{resume}", fg=typer.colors.YELLOW, err=True)
    if hard:
        import os

        sys.stderr.flush()
        os._exit(130)
    sys.exit(130)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(2)


def main() -> None:
    import logging
    import signal

    from ..models import ModelNotFoundError
    from ..spec import PlanError

    signal.signal(signal.SIGINT, _on_sigint)
    # a logger's filter sees only the records logged on that logger, not its children's
    for name in ("optuna", "optuna.study._optimize", "optuna.study._tell"):
        logging.getLogger(name).addFilter(_DropInterruptTracebacks())
    code = 0
    try:
        result = app(standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except KeyboardInterrupt:
        _interrupted()
    except ImportError as e:
        if _state["debug"]:
            raise
        _fail(f"{e} (a missing optional dependency: pip install 'kvtuner[tune]')" if "pip install" not in str(e)
              else str(e))
    except (PlanError, ModelNotFoundError, CLIError, ValueError, OSError) as e:
        if _state["debug"]:
            raise
        _fail(str(e) if not isinstance(e, OSError) or not e.filename else
              f"{e.filename}: {e.strerror or type(e).__name__}")
    except typer.Exit as e:
        code = e.exit_code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:
        # usage errors from typer's click arrive here in non-standalone mode; an interrupt as Abort
        # after a Ctrl-C, whatever a library raised instead of the KeyboardInterrupt is its consequence
        # (optuna raises UnboundLocalError when the interrupt lands while it records a trial)
        if type(e).__name__ == "Abort" or _state["interrupted"]:
            _interrupted()
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise
    if _state["interrupted"] or code == 130:
        _interrupted()
    sys.exit(code)
