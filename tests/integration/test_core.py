"""The core, end to end with real processes on 127.0.0.1."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest

from tests.conftest import RECORDING_TASKS, Processes, read_record

pytestmark = pytest.mark.timeout(60)


def test_tm_run_runs_each_job_exactly_once(procs: Processes, write_tasks, tmp_path: Path) -> None:
    write_tasks(RECORDING_TASKS)
    record = tmp_path / "record.txt"
    result = procs.run(
        "tm-run", "tasks.py", "2", "n=20000", "--no-progress", env={"TM_TEST_RECORD": str(record)}
    )
    assert result.returncode == 0, result.stderr
    ran = collections.Counter(read_record(record))
    assert sorted(ran) == list(range(20000))
    assert set(ran.values()) == {1}
    pids = {line.split()[1] for line in record.read_text().splitlines()}
    assert len(pids) == 2, "both workers took jobs"
    assert "done: 20,000 jobs" in result.stderr


def test_seed_usage_master_then_spawn(procs: Processes, write_tasks, tmp_path: Path) -> None:
    # The 2012 article's example: get_jobs(last=0) yields from a list; handle_job prints.
    write_tasks(
        """
        values = list(range(300))

        def get_jobs(last=0):
            for v in values:
                yield v

        def handle_job(job):
            print(job, flush=True)
        """
    )
    # Buffered stdout, so each print(flush=True) is one write(): with PYTHONUNBUFFERED set
    # (as in some shells and CI), print() writes the number and the newline separately and
    # four processes sharing one pipe interleave them.
    unbuffered = {"PYTHONUNBUFFERED": ""}
    master = procs.start("tm-master", "tasks.py", env=unbuffered)
    spawn = procs.start("tm-spawn", "tasks.py", "4", env=unbuffered)
    spawn_out, spawn_err = spawn.communicate(timeout=30)
    _, master_err = master.communicate(timeout=30)
    assert master.returncode == 0, master_err.decode()
    assert spawn.returncode == 0, spawn_err.decode()
    printed = collections.Counter(int(x) for x in spawn_out.decode().split())
    assert sorted(printed) == list(range(300))
    assert set(printed.values()) == {1}


def test_the_2012_example_module_runs_as_its_commands_were_written(
    procs: Processes, endpoint: str
) -> None:
    # `tm-master taskmaster.example` and `tm-slave taskmaster.example`, as in the 2012 README
    # (with an address of the test's own); PYTHONUNBUFFERED set, as in many shells.
    env = {"PYTHONUNBUFFERED": "1"}
    master = procs.start("tm-master", "taskmaster.example", "--address", endpoint, env=env)
    slave = procs.start("tm-slave", "taskmaster.example", "--address", endpoint, env=env)
    out, err = slave.communicate(timeout=30)
    assert slave.returncode == 0, err.decode()
    _, master_err = master.communicate(timeout=30)
    assert master.returncode == 0, master_err.decode()
    assert out.decode().splitlines() == [f"Got {i}!" for i in range(1000)]
    # And with tm-run, whose workers share one output: each line whole, once.
    run = procs.run("tm-run", "taskmaster.example", "2", "--reset", "--no-progress", env=env)
    assert run.returncode == 0, run.stderr
    assert sorted(run.stdout.splitlines()) == sorted(f"Got {i}!" for i in range(1000))


def test_spawn_before_master_also_works(
    procs: Processes, write_tasks, tmp_path: Path, endpoint: str
) -> None:
    write_tasks(RECORDING_TASKS)
    record = tmp_path / "record.txt"
    env = {"TM_TEST_RECORD": str(record)}
    spawn = procs.start("tm-spawn", "tasks.py", "2", "--address", endpoint, env=env)
    master = procs.start(
        "tm-master", "tasks.py", "n=500", "--address", endpoint, "--no-progress", env=env
    )
    assert master.wait(timeout=30) == 0
    assert spawn.wait(timeout=30) == 0
    assert sorted(read_record(record)) == list(range(500))


def test_module_function_target_and_kwargs(procs: Processes, tmp_path: Path) -> None:
    pkg = tmp_path / "jobs_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "work.py").write_text(
        "import os\n"
        "def numbers(start='0', stop='10'):\n"
        "    yield from range(int(start), int(stop))\n"
        "def handle_job(job):\n"
        "    with open(os.environ['OUT'], 'a') as f:\n"
        "        f.write(f'{job}\\n')\n"
    )
    out = tmp_path / "out.txt"
    result = procs.run(
        "tm-run",
        "jobs_pkg.work:numbers",
        "2",
        "start=5",
        "stop=50",
        "--no-progress",
        env={"OUT": str(out)},
    )
    assert result.returncode == 0, result.stderr
    assert sorted(int(x) for x in out.read_text().split()) == list(range(5, 50))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (None, "no such file"),
        ("def get_jobs(:\n    pass\n", "syntax error"),
        ("def handle_job(job):\n    pass\n", "no function get_jobs()"),
        ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
    ],
)
def test_bad_tasks_file_exits_2_with_one_line(
    procs: Processes, tmp_path: Path, source: str | None, expected: str
) -> None:
    if source is not None:
        (tmp_path / "tasks.py").write_text(source)
    result = procs.run("tm-run", "tasks.py", "2", "--no-progress")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and "tasks.py" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["foo=1"], "get_jobs() takes no argument foo= (it takes n=)"),
        (["n=5", "--get-jobs-callback", "needs_path"], "needs_path() needs path="),
    ],
)
def test_key_value_arguments_get_jobs_cannot_take_exit_2_with_one_line(
    procs: Processes, tmp_path: Path, args: list[str], expected: str
) -> None:
    (tmp_path / "tasks.py").write_text(
        "def get_jobs(n='3'):\n    yield from range(int(n))\n\n"
        "def needs_path(path, n='3'):\n    yield from range(int(n))\n\n"
        "def handle_job(job):\n    pass\n"
    )
    for command in (["tm-run", "tasks.py", "2"], ["tm-master", "tasks.py"]):
        result = procs.run(*command, *args, "--no-progress")
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0] and "tasks.py" in lines[0], lines
    assert not (tmp_path / ".taskmaster").exists() or not list(
        (tmp_path / ".taskmaster").glob("*.db")
    ), "refused before any state was made"


def test_status_json_after_run(procs: Processes, write_tasks, tmp_path: Path) -> None:
    write_tasks(RECORDING_TASKS)
    env = {"TM_TEST_RECORD": str(tmp_path / "record.txt")}
    assert procs.run("tm-run", "tasks.py", "2", "n=100", "--no-progress", env=env).returncode == 0
    status = procs.run("tm", "status", "tasks.py", "n=100", "--json")
    data = json.loads(status.stdout)
    assert data["done"] == 100 and data["failed"] == 0 and data["watermark"] == 100
    assert data["running"] is False and data["updated"]
    for stamp in (data["started"], data["updated"]):  # ISO 8601 (3.10's fromisoformat reads it)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d", stamp), stamp
