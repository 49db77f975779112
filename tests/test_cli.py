"""The command line: fast help, show, and one-line errors."""

import subprocess
import sys
import time

from kvtuner import KVPlan, ModelDims


def _run(*args):
    return subprocess.run([sys.executable, "-c", "from kvtuner.cli import main; main()", *args],
                          capture_output=True, text=True)


def test_help_is_fast_and_lists_commands():
    t0 = time.perf_counter()
    out = _run("--help")
    assert out.returncode == 0 and all(c in out.stdout for c in ("tune", "show", "evaluate"))
    assert time.perf_counter() - t0 < 5


def test_show_prints_layers(tmp_path):
    dims = ModelDims(4, 2, 64, "llama", ("full_attention",) * 4)
    path = KVPlan.from_pairs([(8, 4), (4, 2), (4, 4), (2, 2)]).for_model(dims, "tiny").save(tmp_path / "p.json")
    out = _run("show", str(path))
    assert out.returncode == 0, out.stderr
    assert "K8V4" in out.stdout and "K4V2" in out.stdout and "equivalent bits: 3.750" in out.stdout
    assert "bytes/token" in out.stdout


def test_errors_are_one_red_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"_type": "KVPlan", "_version": 1, "layers": [{"k": {"bits": 5}, "v": {"bits": 4}}]}')
    out = _run("show", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: plan.layers[0].k.bits=5 is invalid; allowed: 2, 3, 4, 6, 8 or 16"
    out = _run("tune", "--model", str(tmp_path / "missing.gguf"))
    assert out.returncode == 2 and "no such .gguf file" in out.stderr and "Traceback" not in out.stderr


def test_search_solver_only_and_budget_check(tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_search import synthetic_table

    table = synthetic_table(6).save(tmp_path / "t.json")
    out = _run("search", str(table), "--budget-bits", "3.25", "--trials", "0", "-o", str(tmp_path / "f.json"))
    assert out.returncode == 0, out.stderr
    assert "best within 3.25 bits" in out.stdout and (tmp_path / "f.json").is_file()
    out = _run("search", str(table), "--budget-bits", "1", "--trials", "0")
    assert out.returncode == 2 and out.stderr.strip() == "error: --budget-bits=1.0 is invalid; allowed: 2..16"
    out = _run("search", str(table), "--budget-bits", "3.25", "--trials", "0", "--refine", "4")
    assert out.returncode == 2 and "--refine=4 is invalid" in out.stderr and "Traceback" not in out.stderr


def test_no_option_metavar_spells_its_own_name():
    # some click versions take a metavar equal to the option's name in capitals as the option's name
    # ("--MODEL"), and then reject --model
    import typer.main

    from kvtuner.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            assert (param.metavar or "") != param.name.upper(), (name, param.name)


def test_tune_help_shows_each_default_and_the_paper_presets():
    import os

    out = subprocess.run([sys.executable, "-c", "from kvtuner.cli import main; main()", "tune", "--help"],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "240", "TERM": "dumb"})
    text = " ".join(out.stdout.replace("\u2502", " ").split())  # rich's box borders split wrapped lines
    assert out.returncode == 0
    for needle in ("(default: 2,3,4,8; paper preset: 2,4,8)", "(default: per-layer; paper preset: off)",
                   "(default: 1; paper preset: 0)", "(default: 3, 3.25, 4)", "(default: smollm2)",
                   "(default: 16)", "(default: OUT/study.db)", "(default: recommended)"):
        assert needle in text, needle
