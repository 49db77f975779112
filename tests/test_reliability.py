"""The command line under bad input, interruption and models with sliding-window layers: honest exit codes,
one-line errors that name the argument or file, nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("optuna", reason="needs the tune extra: pip install 'kvtuner[tune]'")
pytest.importorskip("matplotlib", reason="needs the tune extra: pip install 'kvtuner[tune]'")

ROOT = os.geteuid() == 0  # root reads and writes through any permission bits
SMALL = ("--budget-bits", "3.25", "--trials", "2", "--sequences", "2", "--seq-len", "160", "--eval-prefill", "96",
         "--eval-decode", "48")


def _cmd(*args):
    return [sys.executable, "-c", "from kvtuner.cli import main; main()", *args]


def _run(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env)


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last


@pytest.fixture(scope="module")
def gemma_dir(saved_tiny_model):
    return saved_tiny_model("gemma3", layers=4, heads=4, kv_heads=1, head_dim=32, sliding_window=16)


@pytest.fixture(scope="module")
def gemma_run(gemma_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma-run") / "out"
    r = _run("tune", "--model", str(gemma_dir), "--out", str(out), *SMALL, "--quiet")
    return r, out


def test_tune_and_generate_on_a_sliding_window_model(gemma_run, gemma_dir):
    r, out = gemma_run
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("table.json", "plan-3.25.json", "quality.json", "report.html", "report.md", "kvtuner-run.json"):
        assert (out / name).stat().st_size > 0, name
    assert "MiB" in (out / "report.md").read_text()  # the memory table, sliding layers counted at their window
    g = _run("generate", "--model", str(gemma_dir), "--plan", str(out / "plan-3.25.json"), "--max-new-tokens", "8")
    assert g.returncode == 0, g.stderr[-2000:]
    assert "bytes" in g.stderr and "Traceback" not in g.stderr


def test_artefacts_take_the_umask_permissions(gemma_run):
    _, out = gemma_run
    mode = (out / "plan-3.25.json").stat().st_mode & 0o777
    assert mode == (out / "report.html").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_writes_follow_the_process_umask(tmp_path):
    from kvtuner.spec import atomic_write_json

    old = os.umask(0o027)
    try:
        path = atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_corrupt_cached_artefacts_are_recomputed_and_named(gemma_run, gemma_dir):
    _, out = gemma_run
    (out / "quality.json").write_text("{ not json")
    (out / "table.json").write_text('{"_type": "SensitivityTable"}')
    r = _run("tune", "--model", str(gemma_dir), "--out", str(out), *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{out / 'quality.json'} is not valid JSON" in r.stderr
    assert f"{out / 'table.json'} is not a usable table" in r.stderr and "profiling again" in r.stderr
    assert json.loads((out / "quality.json").read_text())["rows"]


def test_a_corrupt_run_manifest_is_named_and_the_run_starts_afresh(tmp_path):
    from kvtuner.pipeline import _cached_json

    lines = []
    (tmp_path / "kvtuner-run.json").write_text("")
    assert _cached_json(tmp_path / "kvtuner-run.json", lines.append) is None
    assert lines == [f"{tmp_path / 'kvtuner-run.json'} is not valid JSON (JSONDecodeError): computing it again"]


def test_corrupt_study_is_one_line_before_profiling(gemma_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "study.db").write_text("garbage " * 200)
    r = _run("tune", "--model", str(gemma_dir), "--out", str(out), *SMALL)
    _one_line_error(r, "study.db", "not an Optuna database", "fix:")
    assert not (out / "table.json").exists()  # failed before profiling


@pytest.mark.parametrize("storage,needles", [
    ("foo://x", ("--storage foo://x", "unknown database scheme", "allowed:")),
    ("postgresql://kvtuner@127.0.0.1:1/none", ("--storage postgresql://", "cannot be opened")),
    ("DIR", ("is a directory", "allowed:")),
])
def test_unusable_storage_is_one_line_before_profiling(gemma_dir, tmp_path, storage, needles):
    storage = str(tmp_path) if storage == "DIR" else storage
    r = _run("tune", "--model", str(gemma_dir), "--out", str(tmp_path / "o"), *SMALL, "--storage", storage)
    _one_line_error(r, *needles)
    assert not (tmp_path / "o" / "table.json").exists()


def test_bad_arguments_are_one_line(tmp_path, gemma_dir):
    _one_line_error(_run("tune", "--device", "cudax"), "--device='cudax'", "allowed:")
    (tmp_path / "file").write_text("x")
    _one_line_error(_run("tune", "--out", str(tmp_path / "file")), "--out", "is a file", "allowed:")
    _one_line_error(_run("tune", "--sequences", "0"), "sequences=0", "allowed:")
    _one_line_error(_run("generate", "--plan", str(tmp_path)), "is a directory", "allowed:")
    _one_line_error(_run("bench", "--plan", str(tmp_path / "missing.json")), "missing.json", "does not exist")
    # evaluate takes --model like the other commands and checks the plan before loading any model
    _one_line_error(_run("evaluate", "--model", "no/such-model", "--plan", str(tmp_path / "nope.json")), "nope.json",
                    "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("def f(): return 1\n" * 30)
    r = _run("tune", "--model", str(gemma_dir), "--text", str(short), "--out", str(tmp_path / "o"), *SMALL)
    _one_line_error(r, "text has", "allowed: at least")
    assert not (tmp_path / "o" / "table.json").exists()


def test_binary_file_in_a_text_directory_is_named(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("plain text " * 100)
    (d / "b.txt").write_bytes(bytes(range(256)) * 4)
    _one_line_error(_run("tune", "--text", str(d), "--out", str(tmp_path / "o")), "b.txt", "not readable UTF-8")


@pytest.mark.skipif(ROOT, reason="needs a non-root user (root reads and writes through permission bits)")
def test_unreadable_and_unwritable_paths_are_one_line(tmp_path):
    from kvtuner import KVPlan, PlanError

    plan = KVPlan.uniform(2, 4, 4).save(tmp_path / "p.json")
    plan.chmod(0)
    with pytest.raises(PlanError, match="cannot be read"):
        KVPlan.load(plan)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _one_line_error(_run("tune", "--out", str(locked / "o")), "not writable", "allowed:")


def test_an_exit_code_reaches_the_process(monkeypatch):
    import typer

    from kvtuner import cli

    def fake_app(standalone_mode):
        raise typer.Exit(3)

    monkeypatch.setattr(cli, "app", fake_app)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 3
    monkeypatch.setattr(cli, "app", lambda standalone_mode: 4)  # what typer returns for Exit(4) without standalone
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 4


def _interrupt(args, wait_for: str, tmp_path, timeout=300):
    """Start ``kvtuner ARGS``, send SIGINT once stderr shows ``wait_for``, return (exit code, stderr)."""
    err = tmp_path / "stderr.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(err, "w") as f:
        p = subprocess.Popen(_cmd(*args), stdout=subprocess.DEVNULL, stderr=f, env=env)
    deadline = time.time() + timeout
    while wait_for not in err.read_text() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert p.poll() is None, err.read_text()[-2000:]
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    return p.wait(timeout=120), err.read_text()


@pytest.mark.parametrize("stage", ["profiling", "searching"])
def test_sigint_during_tune_exits_130_and_says_a_rerun_resumes(gemma_dir, gemma_run, tmp_path, stage):
    import shutil

    out = tmp_path / "o"
    if stage == "searching":  # from a profiled directory, so that the interrupted run is in the search
        shutil.copytree(gemma_run[1], out)
        for name in ("study.db", "quality.json"):
            (out / name).unlink(missing_ok=True)
    rc, err = _interrupt(("tune", "--model", str(gemma_dir), "--out", str(out), *SMALL[:2], "--trials", "400",
                          *SMALL[4:]), stage, tmp_path)
    assert rc == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted while {stage}") and "resume" in last and str(out) in last, last
    assert "Traceback" not in err, err[-3000:]


def test_sigint_during_bench_and_search_exits_130(saved_tiny_model, tmp_path):
    model = saved_tiny_model("llama", layers=3, heads=4, kv_heads=2, head_dim=32)
    from kvtuner import KVPlan

    plan = KVPlan.uniform(3, 4, 4).save(tmp_path / "p.json")
    rc, err = _interrupt(("bench", "--model", str(model), "--plan", str(plan), "--steps", "1000000"), "timing",
                         tmp_path)
    assert rc == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted"), err[-500:]
    sys.path.insert(0, os.path.dirname(__file__))
    from test_search import synthetic_table

    table = synthetic_table(3).save(tmp_path / "t.json")
    rc, err = _interrupt(("search", str(table), "--model", str(model), "--trials", "500", "--storage",
                          str(tmp_path / "s.db"), "--budget-bits", "3.25"), "searching", tmp_path)
    assert rc == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted"), err[-500:]
