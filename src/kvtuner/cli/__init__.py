"""The ``kvtuner`` command line. Heavy imports (torch, transformers) happen inside commands, so
``kvtuner --help`` stays instant."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Layer-wise mixed-precision KV cache quantization for transformers models.")
_state = {"debug": False}


class CLIError(Exception):
    """A user error: printed as one red line, no traceback (unless --debug)."""


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


ModelArg = Annotated[str, typer.Argument(help="'smollm2' (built in), a hub id, a model directory or a .gguf file.")]
ModeOpt = Annotated[str, typer.Option(help="Quantization mode: 'kivi' or 'per_token'.")]


@app.command(epilog="Examples:\n\n  kvtuner tune\n\n  kvtuner tune smollm2 --mode per_token -o smollm2.kvplan.json")
def tune(model: ModelArg = "smollm2",
         mode: ModeOpt = "kivi",
         tokens: Annotated[int, typer.Option(help="Held-out tokens to measure on.")] = 512,
         tolerance: Annotated[float, typer.Option(help="Allowed relative perplexity increase.")] = 0.01,
         output: Annotated[Path, typer.Option("--output", "-o", help="Plan file to write.")] = Path(
             "smollm2.kvplan.json")) -> None:
    """Measure candidate KV precisions on held-out text and write the cheapest plan within tolerance."""
    from ..data import default_texts, token_ids
    from ..models import load_model
    from ..tune import tune_uniform

    typer.echo(f"loading {model} ...")
    m, tok = load_model(model)
    ids = token_ids(tok, default_texts("evaluation"), tokens)
    typer.echo(f"measuring perplexity on {tokens} held-out tokens (prefill 128, then 16-token steps)")
    result = tune_uniform(m, ids, mode=mode, tolerance=tolerance, model_id=model,
                          progress=lambda name: typer.echo(f"  {mode} {name} ..."))
    typer.echo(f"\n{'pair':<6} {'bits':>5} {'bytes/token':>12} {'ppl':>9} {'vs full':>9}")
    typer.echo(f"{'full':<6} {16:>5} {'':>12} {result.full_ppl:>9.3f}")
    for r in result.rows:
        typer.echo(f"{r['pair']:<6} {r['equivalent_bits']:>5.1f} {r['bytes_per_token']:>12.0f} {r['ppl']:>9.3f} "
                   f"{100 * r['ppl_increase']:>+8.2f}%")
    path = result.plan.save(output)
    verdict = "" if result.plan.provenance["met_tolerance"] else " (no pair met the tolerance: best quality kept)"
    typer.echo(f"\nwrote {path}: {result.plan.layers[0].name} {mode}, {result.plan.equivalent_bits:.2f} equivalent "
               f"bits{verdict}")


@app.command(epilog="Examples:\n\n  kvtuner show smollm2.kvplan.json")
def show(plan: Annotated[Path, typer.Argument(help="A plan file.")]) -> None:
    """Print a plan's per-layer table and its memory per token."""
    from ..spec import KVPlan, ModelDims

    p = KVPlan.load(plan)
    dims = ModelDims(**{**p.model, "layer_types": ("full_attention",) * p.num_layers}) if p.model else None
    typer.echo(f"{plan}: model {p.model_id or '?'}")
    typer.echo(p.describe(dims))


@app.command(epilog="Examples:\n\n  kvtuner evaluate smollm2 --plan smollm2.kvplan.json --tokens 1024")
def evaluate(model: ModelArg = "smollm2",
             plan: Annotated[Path, typer.Option(help="Plan file to evaluate.")] = Path("smollm2.kvplan.json"),
             tokens: Annotated[int, typer.Option(help="Held-out tokens.")] = 1024) -> None:
    """Perplexity of a plan against full precision, through the real cache."""
    from ..data import default_texts, token_ids
    from ..evaluate import perplexity
    from ..models import load_model
    from ..spec import KVPlan

    m, tok = load_model(model)
    p = KVPlan.load(plan, config=m.config)
    ids = token_ids(tok, default_texts("evaluation"), tokens)
    full = perplexity(m, ids, None, prefill=128, chunk_size=16)
    ppl = perplexity(m, ids, p, prefill=128, chunk_size=16)
    typer.echo(f"full precision ppl {full:.4f}\nplan ({p.equivalent_bits:.2f} bits) ppl {ppl:.4f} "
               f"({100 * (ppl / full - 1):+.2f}%)")


@app.command(epilog="Examples:\n\n  kvtuner profile smollm2 -o smollm2.kvtable.json\n\n"
                    "  kvtuner profile smollm2 --mode kivi --sequences 4")
def profile(model: ModelArg = "smollm2",
            mode: Annotated[list[str], typer.Option(help="Modes to profile (repeatable).")] = ["kivi", "per_token"],
            sequences: Annotated[int, typer.Option(help="Calibration windows.")] = 8,
            seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
            output: Annotated[Path, typer.Option("--output", "-o", help="Table file to write.")] = Path(
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
def search(table: Annotated[Path, typer.Argument(help="A sensitivity table from `kvtuner profile`.")],
           budget_bits: Annotated[float, typer.Option(help="Maximum equivalent bits.")] = 4.0,
           mode: ModeOpt = "kivi",
           model: Annotated[str, typer.Option(help="Model for measured trials (as in `tune`).")] = "smollm2",
           trials: Annotated[int, typer.Option(help="Completed NSGA-II trials; 0 = solver only.")] = 24,
           storage: Annotated[str, typer.Option(help="Optuna storage: a .db/.journal path or an RDB URL.")] = "",
           study: Annotated[str, typer.Option(help="Study name shared by workers.")] = "",
           output: Annotated[Path, typer.Option("--output", "-o", help="Front file to write.")] = Path(
               "front.json")) -> None:
    """Search per-layer pairs: prune, cluster, solve, then NSGA-II on measured KL (resumable)."""
    from ..profiling import SensitivityTable
    from ..search import search as run_search

    if not 2 <= budget_bits <= 16:
        raise CLIError(f"--budget-bits={budget_bits} is invalid; allowed: 2..16")
    tab = SensitivityTable.load(table)
    quality = None
    if trials > 0:
        from ..data import default_texts
        from ..models import load_model
        from ..profiling import calibration_batches
        from ..search.objectives import KLObjective

        m, tok = load_model(model)
        tab.check_config(m.config)
        quality = KLObjective(m, calibration_batches(tok, default_texts("calibration"), 10, 640)[-2:])
    front = run_search(tab, mode=mode, max_bits=budget_bits, quality=quality, n_trials=trials,
                       storage=storage or None, study_name=study or None)
    front.save(output)
    plan = front.best(budget_bits)
    typer.echo(f"wrote {output}: {len(front.points)} points ({front.metric}); best within {budget_bits} bits: "
               f"{plan.equivalent_bits:.2f} bits, pairs {plan.pairs}")


def main() -> None:
    from ..models import ModelNotFoundError
    from ..spec import PlanError

    try:
        app(standalone_mode=False)
    except (PlanError, ModelNotFoundError, CLIError, ValueError, FileNotFoundError) as e:
        if _state["debug"]:
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as e:
        # Usage errors from typer's (vendored) click arrive here in non-standalone mode.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise
