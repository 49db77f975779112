"""Two search workers sharing one study on a real PostgreSQL server.

The fixture installs PostgreSQL from the distribution's packages (apt-get) when it is missing, and
starts a private server on a free local port; if that is impossible the test is skipped, naming why.
"""

import glob
import os
import shutil
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else None


def _install():
    if _pg_bin() or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], env=env, capture_output=True, timeout=900)


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="needs psycopg 3 (pip install 'kvtuner[postgres]')")
    _install()
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed and could not be installed with apt-get")
    import pathlib
    import tempfile

    root = pathlib.Path(tempfile.mkdtemp(prefix="kvtuner-pg-"))  # pytest's tmp dirs are closed to other users
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
    if as_user:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run(f"{bindir}/initdb", "-D", str(data), "--auth=trust", "-U", "postgres")
    if r.returncode:
        pytest.skip(f"initdb failed: {r.stderr.strip()[-300:]}")
    r = run(f"{bindir}/pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
            f"-p {port} -k {sock} -h 127.0.0.1", "start")
    if r.returncode:
        pytest.skip(f"PostgreSQL did not start: {r.stderr.strip()[-300:]}")
    try:
        r = run(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "kvtuner")
        assert r.returncode == 0, r.stderr
        yield f"postgresql://postgres@127.0.0.1:{port}/kvtuner"  # the form the CLI help shows
    finally:
        run(f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_postgres(postgres_url):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from test_search import _complete, _worker

    procs = [_worker(postgres_url, 20, 0.05, seed=s) for s in (1, 2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    trials = _complete(postgres_url)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and 20 <= len(numbers) <= 21
    assert any(t.user_attrs["bits"] <= 4.0 for t in trials)  # warm starts put feasible plans first
