"""Master and workers on two "machines": network namespaces joined by a veth pair.

The master binds its own non-loopback address in one namespace; workers run in the other and
reach it only over the link. All traffic stays on the pair (10.200.0.0/24 exists only inside
these namespaces). Skipped, with the reason, where namespaces cannot be made.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskmaster import security
from tests.conftest import RECORDING_TASKS, Processes, read_record, tm_command, wait_until
from tests.netns import Host, Hosts, unavailable

pytestmark = pytest.mark.timeout(120)

PORT = 3050
ADDRESS = f"tcp://10.200.0.1:{PORT}"

SLOW_TASKS = RECORDING_TASKS.replace(
    "def handle_job(job):\n", "def handle_job(job):\n    __import__('time').sleep(0.004)\n"
)


@pytest.fixture
def hosts(procs: Processes) -> Iterator[Hosts]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    made = Hosts().open()
    try:
        yield made
    finally:
        procs.cleanup()  # processes inside the namespaces go first, by process group
        leftover = made.master.pids() + made.worker.pids()
        made.close()
        assert not leftover, f"processes survived the cleanup in the namespaces: {leftover}"


@pytest.fixture(autouse=True)
def _no_secret_in_env(no_secret_in_env: None) -> None:
    """These tests choose their secrets themselves."""


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "tm.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, security.generate_secret().encode() + b"\n")
    os.close(fd)
    return path


def start_on(procs: Processes, host: Host, command: str, *args: str, **kwargs: Any):  # type: ignore[no-untyped-def]
    return procs.start(*host.wrap(tm_command(command), *args), **kwargs)


def status(procs: Processes, *args: str) -> dict[str, Any] | None:
    result = procs.run("tm", "status", "tasks.py", *args, "--json", timeout=30)
    return json.loads(result.stdout) if result.returncode == 0 else None


def test_run_completes_across_hosts(
    procs: Processes, hosts: Hosts, write_tasks, tmp_path: Path, secret_file: Path
) -> None:
    write_tasks(RECORDING_TASKS)
    record = tmp_path / "record.txt"
    env = {"TM_TEST_RECORD": str(record)}
    secret = ("--secret-file", str(secret_file))
    master = start_on(
        procs, hosts.master, "tm-master", "tasks.py", "n=3000", "--address", ADDRESS,
        *secret, "--no-progress", env=env,
    )  # fmt: skip
    spawn = start_on(
        procs, hosts.worker, "tm-spawn", "tasks.py", "2", "--address", ADDRESS, *secret, env=env
    )
    _, master_err = master.communicate(timeout=90)
    assert master.returncode == 0, master_err.decode()
    assert spawn.wait(timeout=30) == 0
    ran = collections.Counter(read_record(record))
    assert sorted(ran) == list(range(3000)) and set(ran.values()) == {1}


def test_bind_on_the_network_without_secret_is_refused(
    procs: Processes, hosts: Hosts, write_tasks
) -> None:
    write_tasks(RECORDING_TASKS)
    env = {"TM_TEST_RECORD": "unused"}
    master = start_on(procs, hosts.master, "tm-master", "tasks.py", "--address", ADDRESS, env=env)
    _, err = master.communicate(timeout=30)
    assert master.returncode == 2
    assert "tm secret" in err.decode() and "--secret-file" in err.decode()


def test_wrong_secret_gets_no_job(
    procs: Processes, hosts: Hosts, write_tasks, tmp_path: Path, secret_file: Path, logs
) -> None:
    write_tasks(RECORDING_TASKS)
    record = tmp_path / "record.txt"
    env = {"TM_TEST_RECORD": str(record)}
    start_on(
        procs, hosts.master, "tm-master", "tasks.py", "n=100", "--address", ADDRESS,
        "--secret-file", str(secret_file), "--no-progress", env=env, stderr=logs("master.log"),
    )  # fmt: skip
    wait_until(lambda: (status(procs, "n=100") or {}).get("running"), timeout=30)
    wrong = {**env, security.SECRET_ENV: security.generate_secret()}
    started = time.monotonic()
    worker = start_on(procs, hosts.worker, "tm-worker", "tasks.py", "--address", ADDRESS, env=wrong)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode != 0
    assert time.monotonic() - started < 30, "a wrong secret must not wait out --wait (60s)"
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "secret" in lines[0], err.decode()
    assert not record.exists()
    data = status(procs, "n=100")
    assert data is not None and data["running"] and data["done"] == 0


def test_cut_link_loses_no_job(
    procs: Processes, hosts: Hosts, write_tasks, tmp_path: Path, secret_file: Path, logs
) -> None:
    write_tasks(SLOW_TASKS)
    record = tmp_path / "record.txt"
    env = {"TM_TEST_RECORD": str(record)}
    secret = ("--secret-file", str(secret_file))
    n = 3000
    master = start_on(
        procs, hosts.master, "tm-master", "tasks.py", f"n={n}", "--address", ADDRESS, *secret,
        "--liveness", "2", "--no-progress", env=env, stderr=logs("master.log"),
    )  # fmt: skip
    spawn = start_on(
        procs, hosts.worker, "tm-spawn", "tasks.py", "2", "--address", ADDRESS, *secret,
        env=env, stderr=logs("spawn.log"),
    )  # fmt: skip
    master_log = tmp_path / "master.log"
    wait_until(lambda: len(read_record(record)) >= 300, timeout=60)
    hosts.link(up=False)
    try:
        # Longer than the liveness window: the master gives up on both workers (and requeues
        # their jobs) while they, on their side, stop hearing from it.
        wait_until(lambda: len(re.findall(r"lost worker", master_log.read_text())) >= 2, 30)
        ran_during_cut = len(read_record(record))
        assert ran_during_cut < n, "the run must still be going when the link comes back"
    finally:
        hosts.link(up=True)
    assert master.wait(timeout=90) == 0, master_log.read_text()[-3000:]
    assert spawn.wait(timeout=30) == 0, (tmp_path / "spawn.log").read_text()[-3000:]
    ran = collections.Counter(read_record(record))
    assert sorted(ran) == list(range(n)), "no job lost"
    data = status(procs, f"n={n}")
    assert data is not None and data["done"] == n and data["failed"] == 0
