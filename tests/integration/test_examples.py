"""Every example in ``examples/`` does the real job it claims, run the way the README runs it,
and the Python API (``taskmaster.run``) keeps its promises."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import Processes, wait_until

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name: str) -> str:
    return str(EXAMPLES / name)


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def status(procs: Processes, *args: str) -> dict[str, object]:
    result = procs.run("tm", "status", *args, "--json")
    return json.loads(result.stdout) if result.returncode == 0 else {}


def test_hello(procs: Processes) -> None:
    result = procs.run("tm-run", example("hello.py"), "2", "n=3000", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "done: 3,000 jobs" in result.stderr
    data = status(procs, example("hello.py"), "n=3000")
    assert data["done"] == 3000 and data["total"] == 3000 and data["complete"] is True


def test_key_value_arguments_may_follow_options(procs: Processes) -> None:
    # `tm-run tasks.py 4 --threads 8 n=100` is how people type it; argparse alone stops
    # collecting positionals at the first option.
    result = procs.run("tm-run", example("hello.py"), "2", "--no-progress", "n=500")
    assert result.returncode == 0, result.stderr
    assert "done: 500 jobs" in result.stderr


# -- hash_files ---------------------------------------------------------------------------------


def make_tree(root: Path, rng: random.Random) -> list[Path]:
    files = []
    for d in ["", "a", "a/b", "a/b/c", "a-b", "B", "z"]:
        (root / d).mkdir(parents=True, exist_ok=True)
        for i in range(rng.randint(1, 6)):
            path = root / d / f"f{i}{rng.choice(['', '.txt', '-x'])}"
            path.write_bytes(rng.randbytes(rng.randint(0, 3 << 20 if i == 0 else 5000)))
            files.append(path)
    (root / "a" / "link").symlink_to(root / "z")  # symlinks are not followed
    return files


def test_hash_files_walk_resumes_exactly_at_last(tmp_path: Path) -> None:
    hash_files = load_example("hash_files")
    make_tree(tmp_path, random.Random(7))
    everything = list(hash_files.get_jobs(root=str(tmp_path)))
    assert everything == sorted(everything, key=lambda p: Path(p).parts)
    assert len(everything) == hash_files.count_jobs(root=str(tmp_path))
    for i, last in enumerate(everything):
        assert list(hash_files.get_jobs(root=str(tmp_path), last=last)) == everything[i:]


def test_hash_files_hashes_every_file_once_per_path(procs: Processes, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    files = make_tree(tree, random.Random(1))
    db = tmp_path / "out" / "hashes.db"
    db.parent.mkdir()
    env = {"HASHES_DB": str(db)}
    args = ("tm-run", example("hash_files.py"), "2", f"root={tree}", "--no-progress")
    result = procs.run(*args, env=env)
    assert result.returncode == 0, result.stderr
    with closing(sqlite3.connect(db)) as conn:
        rows = {p: (size, digest) for p, size, digest in conn.execute("SELECT * FROM hashes")}
    expected = {
        str(f): (f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files
    }
    assert rows == expected
    # Again from scratch: the same rows, not twice as many (INSERT OR REPLACE by path).
    assert procs.run(*args, "--reset", env=env).returncode == 0
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM hashes").fetchone()[0] == len(files)


# -- migrate_sqlite -----------------------------------------------------------------------------


def migrate(procs: Processes, *, rows: int) -> None:
    setup = procs.run(sys.executable, example("migrate_sqlite.py"), "--setup", "--rows", str(rows))
    assert setup.returncode == 0, setup.stderr
    assert f"users.db: {rows:,} rows in table users" in setup.stdout


def check(procs: Processes) -> subprocess.CompletedProcess[str]:
    return procs.run(sys.executable, example("migrate_sqlite.py"), "--check")


def test_migrate_sqlite_resumes_after_ctrl_c(procs: Processes) -> None:
    migrate(procs, rows=300_000)
    target = example("migrate_sqlite.py")
    assert check(procs).returncode == 1  # nothing migrated yet
    run = procs.start("tm-run", target, "2", "batch=500", "--no-progress")
    wait_until(lambda: (status(procs, target, "batch=500").get("done") or 0) >= 50, timeout=60)
    os.killpg(run.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    _, err = run.communicate(timeout=30)
    assert run.returncode == 130, err.decode()
    assert "interrupted: resumable" in err.decode()
    stopped = status(procs, target, "batch=500")
    assert stopped["running"] is False and stopped["complete"] is False
    assert 50 <= int(stopped["done"]) < 600  # type: ignore[call-overload]

    again = procs.run("tm-run", target, "2", "batch=500", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "done: 600 jobs (" in again.stderr and " this run)" in again.stderr
    verdict = check(procs)
    assert verdict.returncode == 0, verdict.stdout
    assert "users_v2.db: 300,000/300,000 rows migrated, 0 wrong: ok" in verdict.stdout


def test_migrate_sqlite_in_two_shards(procs: Processes) -> None:
    migrate(procs, rows=20_000)
    target = example("migrate_sqlite.py")
    shards = [
        procs.start("tm-run", target, "1", f"shard={k}", "of=2", "--no-progress") for k in range(2)
    ]
    for shard in shards:
        _, err = shard.communicate(timeout=60)
        assert shard.returncode == 0, err.decode()
        assert "done: 10 jobs" in err.decode()
    assert check(procs).returncode == 0
    states = {status(procs, target, f"shard={k}", "of=2")["state"] for k in range(2)}
    assert len(states) == 2, "each shard has its own state"


# -- fetch_async --------------------------------------------------------------------------------


def test_fetch_async_runs_many_requests_at_once(procs: Processes) -> None:
    args = ("tm-run", example("fetch_async.py"), "2", "n=2000", "--concurrency", "50")
    result = procs.run(*args, "--no-progress", env={"FETCH_LATENCY": "0.2"})
    assert result.returncode == 0, result.stderr
    assert "done: 2,000 jobs" in result.stderr
    # 2,000 requests of 0.2 s on 2 workers: 200 s one at a time, 4 s with 50 in the air each.
    seconds = float(result.stderr.split(" jobs in ")[1].split("s")[0])
    assert seconds < 60, result.stderr


# -- the Python API -----------------------------------------------------------------------------


def test_primes_script_uses_functions_from_main_and_resumes(procs: Processes) -> None:
    first = procs.run(sys.executable, example("primes.py"), "300000", "2")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "25,997 primes below 300,000 (6 blocks)"
    assert "state .taskmaster/primes.get_jobs-" in first.stderr
    again = procs.run(sys.executable, example("primes.py"), "300000", "2")
    assert again.returncode == 0, again.stderr
    assert "already complete: 6 jobs done" in again.stderr
    assert again.stdout == first.stdout


def test_run_returns_a_summary_and_records_failures(procs: Processes, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "import taskmaster\n"
        "def get_jobs():\n"
        "    yield from range(100)\n"
        "def handle_job(n):\n"
        "    if n in (3, 50):\n"
        "        raise ValueError(n)\n"
        "if __name__ == '__main__':\n"
        "    r = taskmaster.run(get_jobs, handle_job, 2, progress='none')\n"
        "    print(r.status, r.done, r.failed, r.ok, r.interrupted, r.state_path)\n"
    )
    result = procs.run(sys.executable, str(script))
    assert result.stdout.split() == [
        "1",
        "98",
        "2",
        "False",
        "False",
        ".taskmaster/script.get_jobs.db",
    ]
    assert (
        "list them with `tm failures script.get_jobs --state .taskmaster/script.get_jobs.db`"
        in result.stderr
    )
    failures = procs.run(
        "tm", "failures", "script.get_jobs", "--state", ".taskmaster/script.get_jobs.db", "--json"
    )
    assert [f["job_id"] for f in json.loads(failures.stdout)] == [3, 50]
