"""Failures are data: exceptions, retries, timeouts, dead workers and poison jobs (issue 4).

Real tm commands on 127.0.0.1. Handlers append one line per run of a job to a record file
(``job pid time``), so the tests assert what ran, how often and where, not log lines.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import Processes, read_record, wait_until
from tests.proxy import ResettingProxy

pytestmark = pytest.mark.timeout(90)

# What every tasks file below starts with: get_jobs over range(n) that honours `last`, and
# record() to note a run of a job in $TM_TEST_RECORD.
PRELUDE = """
import os, sys, time

RECORD = os.environ["TM_TEST_RECORD"]

def record(job):
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{job} {os.getpid()} {time.time():.6f}\\n".encode())
    finally:
        os.close(fd)

def runs_so_far(job):
    # How many times this job started before, counted in a file of its own.
    path = os.path.join(os.path.dirname(RECORD), f"count-{job}")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
    return os.path.getsize(path) - 1

def get_jobs(n="1000", last=None, **kwargs):
    for i in range(last if last is not None else 0, int(n)):
        yield i
"""


def tasks(body: str) -> str:
    return PRELUDE + "\n" + textwrap.dedent(body).strip() + "\n"


def records(path: Path) -> list[tuple[int, int, float]]:
    """(job, pid, start time) for every run, in the order they started."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        job, pid, at = line.split()
        out.append((int(job), int(pid), float(at)))
    return out


def failures_json(procs: Processes, *args: str) -> list[dict[str, object]]:
    result = procs.run("tm", "failures", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def status_json(procs: Processes, *args: str) -> dict[str, object]:
    result = procs.run("tm", "status", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def finish(procs: Processes, *running: subprocess.Popen[bytes], timeout: float) -> list[str]:
    """Wait for every process to exit; on a timeout, fail with what each wrote to stderr."""
    deadline = time.monotonic() + timeout
    errors: list[str] = []
    for proc in running:
        try:
            _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            left = running[len(errors) :]
            for other in left:
                procs.kill(other)
            errors += [other.communicate()[1].decode() for other in left]
            report = "\n".join(
                f"{p.args} stderr:\n{e}" for p, e in zip(running, errors, strict=True)
            )
            raise AssertionError(f"not finished in {timeout}s\n{report}") from None
        errors.append(err.decode())
    return errors


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "record.txt"


@pytest.fixture
def env(record: Path) -> dict[str, str]:
    return {"TM_TEST_RECORD": str(record)}


# -- exceptions ------------------------------------------------------------------------------


def test_jobs_that_raise_are_recorded_and_listed(procs: Processes, write_tasks, record, env):
    write_tasks(
        tasks(
            """
            def handle_job(job):
                record(job)
                if job % 97 == 0:
                    raise ValueError(f"{job} is divisible by 97")
            """
        )
    )
    result = procs.run("tm-run", "tasks.py", "2", "n=1000", "--no-progress", env=env)
    assert result.returncode == 1, result.stderr
    expected = list(range(0, 1000, 97))
    ran = collections.Counter(read_record(record))
    assert sorted(ran) == list(range(1000)) and set(ran.values()) == {1}, "the run went on"
    # The summary says how many failed and how to list them; the command it gives works.
    hint = re.search(r"(\d+) jobs? failed: list them with `([^`]+)`", result.stderr)
    assert hint, result.stderr
    assert int(hint.group(1)) == len(expected)
    command = hint.group(2).split()
    assert command[:2] == ["tm", "failures"]
    failures = failures_json(procs, *command[2:])
    assert [f["job_id"] for f in failures] == expected
    for f in failures:
        assert set(f) >= {"job_id", "job", "attempts", "error", "message", "traceback"}
        assert f["job"] == repr(f["job_id"])
        assert f["attempts"] == 1
        assert f["error"] == "ValueError"
        assert f["message"] == f"{f['job_id']} is divisible by 97"
        assert "Traceback" in f["traceback"] and "in handle_job" in f["traceback"]
        assert f"ValueError: {f['message']}" in f["traceback"]
    status = status_json(procs, "tasks.py", "n=1000")
    assert status["failed"] == len(expected)
    assert status["done"] == 1000 - len(expected)
    assert status["watermark"] == 1000 and status["complete"] is True


def test_failures_among_slow_jobs_do_not_stall_the_run(procs: Processes, write_tasks, record, env):
    # Slow jobs keep a worker's credit window at one or two jobs: a failed job must give its
    # slot back like a done one, or the worker stops asking for work and the run hangs.
    write_tasks(
        tasks(
            """
            def handle_job(job):
                record(job)
                time.sleep(0.05)
                if job % 5 == 0:
                    raise ValueError(job)
            """
        )
    )
    result = procs.run("tm-run", "tasks.py", "1", "n=20", "--no-progress", env=env, timeout=40)
    assert result.returncode == 1, result.stderr
    assert sorted(read_record(record)) == list(range(20))
    assert [f["job_id"] for f in failures_json(procs, "tasks.py", "n=20")] == [0, 5, 10, 15]


def test_retries_turn_a_flaky_job_into_done(procs: Processes, write_tasks, record, env):
    write_tasks(
        tasks(
            """
            def handle_job(job):
                record(job)
                before = runs_so_far(job)
                if job == 7:
                    raise RuntimeError(f"job 7 always fails (run {before + 1})")
                if job % 10 == 3 and before < 2:
                    raise RuntimeError(f"flaky, run {before + 1}")
            """
        )
    )
    result = procs.run(
        "tm-run", "tasks.py", "2", "n=100", "--retries", "2", "--no-progress", env=env
    )
    assert result.returncode == 1, result.stderr
    ran = collections.Counter(read_record(record))
    flaky = range(3, 100, 10)
    assert sorted(ran) == list(range(100))
    assert {job: ran[job] for job in flaky} == {job: 3 for job in flaky}, "failed twice, then done"
    assert ran[7] == 3, "a job that keeps raising runs 1 + --retries times"
    assert sum(ran.values()) == 100 + 2 * len(flaky) + 2
    failures = failures_json(procs, "tasks.py", "n=100")
    assert [(f["job_id"], f["attempts"], f["message"]) for f in failures] == [
        (7, 3, "job 7 always fails (run 3)")
    ]
    status = status_json(procs, "tasks.py", "n=100")
    assert status["done"] == 99 and status["failed"] == 1
    assert status["retried"] == 2 * len(flaky) + 2


def test_retry_failed_reruns_only_the_recorded_failures(procs: Processes, write_tasks, record, env):
    # Jobs are dicts; a retry must use the stored payloads, so get_jobs refuses to run then.
    write_tasks(
        tasks(
            """
            def get_jobs(n="100", last=None, **kwargs):
                if os.environ.get("TM_TEST_NO_GET_JOBS"):
                    raise AssertionError("--retry-failed must not call get_jobs")
                start = last["id"] if last is not None else 0
                for i in range(start, int(n)):
                    yield {"id": i, "name": f"item-{i}"}

            def handle_job(job):
                assert job["name"] == f"item-{job['id']}"
                record(job["id"])
                before = runs_so_far(job["id"])
                if job["id"] % 20 == 13:
                    raise RuntimeError(f"{job['name']} is broken")
                if job["id"] % 20 == 3 and before == 0:
                    raise RuntimeError(f"{job['name']} failed once")
            """
        )
    )
    first = procs.run("tm-run", "tasks.py", "2", "n=100", "--no-progress", env=env)
    assert first.returncode == 1, first.stderr
    failing = list(range(3, 100, 10))
    assert [f["job_id"] for f in failures_json(procs, "tasks.py", "n=100")] == failing
    runs_before = len(read_record(record))
    assert runs_before == 100

    retry_env = {**env, "TM_TEST_NO_GET_JOBS": "1"}
    second = procs.run(
        "tm-run", "tasks.py", "2", "n=100", "--retry-failed", "--no-progress", env=retry_env
    )
    assert second.returncode == 1, second.stderr
    assert sorted(read_record(record)[runs_before:]) == failing, "only the failures ran again"
    still = list(range(13, 100, 20))
    failures = failures_json(procs, "tasks.py", "n=100")
    assert [f["job_id"] for f in failures] == still
    assert all(f["attempts"] == 2 for f in failures), failures
    assert all(
        f["job"] == repr({"id": f["job_id"], "name": f"item-{f['job_id']}"}) for f in failures
    )
    status = status_json(procs, "tasks.py", "n=100")
    assert status["done"] == 100 - len(still) and status["failed"] == len(still)

    third = procs.run(
        "tm-run", "tasks.py", "2", "n=100", "--retry-failed", "--no-progress", env=retry_env
    )
    assert third.returncode == 1, third.stderr
    assert sorted(read_record(record)[runs_before + len(failing) :]) == still
    assert [f["attempts"] for f in failures_json(procs, "tasks.py", "n=100")] == [3] * len(still)


def test_retrying_the_failures_of_an_unfinished_run_leaves_the_rest_to_run(
    procs: Processes, write_tasks, record, env
):
    write_tasks(
        tasks(
            """
            def get_jobs(n="100", last=None, **kwargs):
                for i in range(last if last is not None else 0, int(n)):
                    if i == 60 and os.environ.get("TM_TEST_STOP_AT_60"):
                        raise RuntimeError("the source went away")
                    yield i

            def handle_job(job):
                record(job)
                if job % 10 == 3 and not os.environ.get("TM_TEST_FIXED"):
                    raise RuntimeError("broken")
            """
        )
    )
    first = procs.run(
        "tm-run", "tasks.py", "2", "--no-progress", env={**env, "TM_TEST_STOP_AT_60": "1"}
    )
    assert first.returncode == 1, first.stderr
    assert status_json(procs, "tasks.py")["complete"] is False
    fixed = {**env, "TM_TEST_FIXED": "1"}
    retry = procs.run("tm-run", "tasks.py", "2", "--retry-failed", "--no-progress", env=fixed)
    assert retry.returncode == 0, retry.stderr
    status = status_json(procs, "tasks.py")
    assert (status["failed"], status["complete"]) == (0, False), "jobs 60-99 never ran yet"
    rest = procs.run("tm-run", "tasks.py", "2", "--no-progress", env=fixed)
    assert rest.returncode == 0 and "done: 100 jobs" in rest.stderr, rest.stderr
    assert sorted(set(read_record(record))) == list(range(100))


def test_retry_failed_status_keeps_the_runs_total(procs: Processes, write_tasks, record, env):
    write_tasks(
        tasks(
            """
            def count_jobs(n="1000", **kwargs):
                return int(n)

            def handle_job(job):
                if job == 5 and runs_so_far(job) == 0:
                    raise RuntimeError("once")
            """
        )
    )
    assert procs.run("tm-run", "tasks.py", "1", "n=50", "--no-progress", env=env).returncode == 1
    assert status_json(procs, "tasks.py", "n=50")["total"] == 50
    again = procs.run("tm-run", "tasks.py", "1", "n=50", "--retry-failed", "--no-progress", env=env)
    assert again.returncode == 0, again.stderr
    status = status_json(procs, "tasks.py", "n=50")
    assert (status["done"], status["failed"], status["pending"]) == (50, 0, 0)
    assert status["total"] == 50, "a retry of one failure is not a run of one job"


# -- dead workers, timeouts ------------------------------------------------------------------


def test_a_job_that_kills_its_worker_is_failed_after_bounded_attempts(
    procs: Processes, write_tasks, record, env
):
    write_tasks(
        tasks(
            """
            def handle_job(job):
                record(job)
                time.sleep(0.002)
                if job == 50:
                    os._exit(1)
            """
        )
    )
    started = time.monotonic()
    result = procs.run("tm-run", "tasks.py", "2", "n=300", "--no-progress", env=env, timeout=80)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    ran = collections.Counter(read_record(record))
    assert sorted(ran) == list(range(300)), "every other job completed"
    failures = failures_json(procs, "tasks.py", "n=300")
    assert [(f["job_id"], f["error"]) for f in failures] == [(50, "WorkerLost")]
    assert failures[0]["attempts"] == ran[50], "each death of its worker is an attempt"
    assert ran[50] <= 3, f"job 50 killed its worker {ran[50]} times; --max-attempts is 3"
    status = status_json(procs, "tasks.py", "n=300")
    assert status["done"] == 299 and status["failed"] == 1
    print(f"poison job failed after 3 deaths; run took {elapsed:.1f}s")
    assert elapsed < 40, f"the run took {elapsed:.1f}s: crash-loop backoff or slow detection"


def assert_killer_failed(procs: Processes, record: Path, n: int, job: int, attempts: int) -> None:
    """Every job of range(n) ran; ``job`` killed its worker ``attempts`` times, and is
    recorded as failed (WorkerLost) after exactly that many attempts."""
    ran = collections.Counter(read_record(record))
    assert sorted(ran) == list(range(n))
    assert ran[job] == attempts, f"job {job} killed its worker {ran[job]} times, not {attempts}"
    failures = failures_json(procs, "tasks.py", f"n={n}")
    found = [(f["job_id"], f["error"], f["attempts"]) for f in failures]
    assert found == [(job, "WorkerLost", attempts)]


def test_max_attempts_bounds_the_deliveries(procs: Processes, write_tasks, record, env):
    write_tasks(
        tasks(
            """
            def handle_job(job):
                record(job)
                if job == 3:
                    os._exit(1)
            """
        )
    )
    result = procs.run(
        "tm-run", "tasks.py", "1", "n=20", "--max-attempts", "1", "--no-progress", env=env
    )
    assert result.returncode == 1, result.stderr
    assert_killer_failed(procs, record, n=20, job=3, attempts=1)


def test_a_slow_init_worker_does_not_hide_which_job_killed_its_predecessor(
    procs: Processes, write_tasks, record, env
):
    # init_worker outlasts the master's probe window (PROBE_WINDOW_S, 1 s): the replacement
    # must name the job that killed its predecessor before init_worker, not after the master
    # gave up on the dead worker and sent that job out again, uncharged.
    write_tasks(
        tasks(
            """
            def init_worker():
                time.sleep(1.5)

            def handle_job(job):
                record(job)
                if job == 7:
                    os._exit(1)
            """
        )
    )
    result = procs.run(
        "tm-run", "tasks.py", "2", "n=40", "--max-attempts", "2", "--no-progress", env=env
    )
    assert result.returncode == 1, result.stderr
    assert_killer_failed(procs, record, n=40, job=7, attempts=2)


def test_a_replacement_whose_init_worker_fails_still_names_the_job(
    procs: Processes, write_tasks, record, tmp_path, env
):
    # Job 7 kills its worker and breaks init_worker for every worker after it. Its
    # replacement must deliver the last words (job 7 charged, not suspected) and leave with
    # a BYE, not cut its connection mid-handshake.
    marker = tmp_path / "broken"
    write_tasks(
        tasks(
            f"""
            def init_worker():
                if os.path.exists({str(marker)!r}):
                    raise RuntimeError("no database here")

            def handle_job(job):
                record(job)
                if job == 7:
                    open({str(marker)!r}, "w").close()
                    os._exit(1)
                time.sleep(0.02)  # the run outlasts the replacement's start: it has a master
            """
        )
    )
    run = procs.run(
        "tm-run", "tasks.py", "2", "n=60", "--max-attempts", "1", "--no-progress",
        "--log-level", "info", env=env,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert_killer_failed(procs, record, n=60, job=7, attempts=1)
    assert "reason=init_worker() failed" in run.stderr, run.stderr
    assert "CURVE handshake" not in run.stderr, run.stderr


def test_connection_resets_lose_no_job_and_stall_nothing(
    procs: Processes, write_tasks, record, env, endpoint: str, logs, tmp_path: Path
):
    # Each reset drops what was in flight both ways: JOBS the master counts as the worker's,
    # credit the worker counts as granted. Both sides see the connection die, the worker
    # reconnects and nobody is lost, so only a fresh session brings those jobs back.
    write_tasks(
        tasks(
            """
            def handle_job(job):
                record(job)
                time.sleep(0.002)
            """
        )
    )
    n = 3000

    def fresh_jobs_by_worker(since: float) -> int:
        started = collections.Counter(pid for _, pid, at in records(record) if at > since)
        return min(started.values()) if len(started) == 2 else 0

    master = procs.start(
        "tm-master", "tasks.py", f"n={n}", "--address", endpoint, "--no-progress",
        env=env, stderr=logs("master.log"),
    )  # fmt: skip
    proxy = ResettingProxy(int(endpoint.rsplit(":", 1)[1]))
    try:
        spawn = procs.start(
            "tm-spawn", "tasks.py", "2", "--address", f"tcp://127.0.0.1:{proxy.port}",
            env=env, stderr=logs("spawn.log"),
        )  # fmt: skip
        last_reset = 0.0
        for _ in range(6):
            # Both workers got jobs again: their new sessions are up, past the handshake (a
            # reset in a handshake looks like a master with another secret, and counts so).
            wait_until(lambda since=last_reset: fresh_jobs_by_worker(since) >= 30, timeout=30)
            proxy.reset(swallow_s=0.2)  # JOBS sent meanwhile are lost with the connection
            last_reset = time.time()
        assert len(read_record(record)) < n, "the resets must come while the run goes on"
        assert master.wait(timeout=60) == 0, (tmp_path / "master.log").read_text()[-3000:]
        assert spawn.wait(timeout=30) == 0, (tmp_path / "spawn.log").read_text()[-3000:]
    finally:
        proxy.close()
    assert sorted(set(read_record(record))) == list(range(n)), "no job lost"
    assert "the connection to the master was reset" in (tmp_path / "spawn.log").read_text()


def test_a_job_past_the_timeout_is_failed_and_its_worker_replaced(
    procs: Processes, write_tasks, record, env
):
    write_tasks(
        tasks(
            """
            def handle_job(job):
                record(job)
                if job == 10:
                    time.sleep(60)
            """
        )
    )
    # One worker: the run can only finish if that worker is replaced.
    started = time.monotonic()
    result = procs.run(
        "tm-run", "tasks.py", "1", "n=40", "--timeout", "2", "--no-progress", env=env
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    runs = records(record)
    ran = collections.Counter(job for job, _, _ in runs)
    assert sorted(ran) == list(range(40)) and ran[10] == 1
    stuck_pid = next(pid for job, pid, _ in runs if job == 10)
    after = {pid for job, pid, _ in runs[runs.index(next(r for r in runs if r[0] == 10)) + 1 :]}
    assert after and stuck_pid not in after, "a fresh worker ran the rest"
    failures = failures_json(procs, "tasks.py", "n=40")
    assert [(f["job_id"], f["error"], f["attempts"]) for f in failures] == [(10, "Timeout", 1)]
    assert "2" in str(failures[0]["message"])
    assert elapsed < 30


def test_sigkill_of_a_worker_under_spawn_redelivers_its_jobs(
    procs: Processes, write_tasks, record, env, endpoint: str
):
    # Job 100 hangs on its first run only, so the worker it is on is surely holding it when
    # it is killed; the time to its second start is the time to detect the death and
    # re-deliver, with default settings.
    write_tasks(
        tasks(
            """
            def handle_job(job):
                record(job)
                if job == 100 and runs_so_far(job) == 0:
                    time.sleep(60)
                time.sleep(0.005)
            """
        )
    )
    master = procs.start(
        "tm-master", "tasks.py", "n=600", "--address", endpoint, "--no-progress",
        "--log-level", "info", env=env,
    )  # fmt: skip
    spawn = procs.start("tm-spawn", "tasks.py", "2", "--address", endpoint, env=env)
    wait_until(lambda: any(job == 100 for job, _, _ in records(record)), timeout=30)
    victim = next(pid for job, pid, _ in records(record) if job == 100)
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    master_err, spawn_err = finish(procs, master, spawn, timeout=60)
    assert master.returncode == 0, master_err
    assert spawn.returncode == 0, spawn_err
    runs = records(record)
    ran = collections.Counter(job for job, _, _ in runs)
    assert sorted(ran) == list(range(600)), "every job done"
    again = [(pid, at) for job, pid, at in runs if job == 100][1:]
    assert again and again[0][0] != victim
    redelivery_s = again[0][1] - killed_at
    print(f"\nSIGKILL to re-delivery of the held job: {redelivery_s:.2f}s (default settings)")
    assert redelivery_s < 15, f"re-delivery took {redelivery_s:.1f}s (target < 5s)"
    assert len(runs) - 600 < 50, "re-runs are bounded by what the dead worker held"


# -- bad jobs, bad generators, bad workers ---------------------------------------------------


def test_unpicklable_and_oversized_jobs_are_failed_and_the_run_goes_on(
    procs: Processes, write_tasks, record, env
):
    write_tasks(
        tasks(
            """
            import threading

            def get_jobs(n="50", last=None, **kwargs):
                for i in range(int(n)):
                    if i == 5:
                        yield threading.Lock()
                    elif i == 8:
                        yield b"x" * 100_000
                    else:
                        yield i

            def handle_job(job):
                record(job)
            """
        )
    )
    result = procs.run(
        "tm-run", "tasks.py", "2", "--max-job-bytes", "10000", "--no-progress", env=env
    )
    assert result.returncode == 1, result.stderr
    assert sorted(read_record(record)) == [i for i in range(50) if i not in (5, 8)]
    failures = failures_json(procs, "tasks.py")
    assert [f["job_id"] for f in failures] == [5, 8]
    lock, big = failures
    assert "pickle" in str(lock["message"]) and "lock" in str(lock["job"])
    assert "10,000" in str(big["message"]) or "10000" in str(big["message"])
    status = status_json(procs, "tasks.py")
    assert status["done"] == 48 and status["failed"] == 2 and status["complete"] is True


def test_get_jobs_raising_stops_there_and_a_restart_resumes_there(
    procs: Processes, write_tasks, record, env, tmp_path: Path
):
    write_tasks(
        tasks(
            """
            def get_jobs(n="2000", last=None, **kwargs):
                for i in range(last if last is not None else 0, int(n)):
                    if i == 1000 and not os.path.exists("fixed"):
                        raise RuntimeError("the source went away at 1000")
                    yield i

            def handle_job(job):
                record(job)
            """
        )
    )
    first = procs.run("tm-run", "tasks.py", "2", "--no-progress", env=env)
    assert first.returncode != 0
    assert "get_jobs raised at job 1000" in first.stderr, first.stderr
    assert (
        "Traceback" in first.stderr and "RuntimeError: the source went away at 1000" in first.stderr
    )
    ran = collections.Counter(read_record(record))
    assert sorted(ran) == list(range(1000)), "the jobs before it are done, none after"
    assert set(ran.values()) == {1}
    status = status_json(procs, "tasks.py")
    assert "the source went away at 1000" in str(status["generator_error"])
    assert status["watermark"] == 1000 and status["complete"] is False

    (tmp_path / "fixed").touch()
    second = procs.run("tm-run", "tasks.py", "2", "--no-progress", env=env)
    assert second.returncode == 0, second.stderr
    ran = collections.Counter(read_record(record))
    assert sorted(ran) == list(range(2000)) and set(ran.values()) == {1}, "0..999 not re-run"
    status = status_json(procs, "tasks.py")
    assert status["generator_error"] is None and status["complete"] is True


def test_an_init_worker_that_always_fails_ends_the_run_saying_why(
    procs: Processes, write_tasks, record, env
):
    write_tasks(
        tasks(
            """
            def init_worker():
                raise RuntimeError("no database here")

            def handle_job(job):
                record(job)
            """
        )
    )
    run = procs.run("tm-run", "tasks.py", "2", "n=10", "--no-progress", env=env, timeout=60)
    assert run.returncode == 1, run.stderr
    assert "no worker could start: init_worker() failed in each" in run.stderr
    # Each worker slot's first failure has its traceback; its retries say it in one line.
    assert run.stderr.count("Traceback") == 2, run.stderr
    assert run.stderr.count("init_worker() failed again: RuntimeError: no database here") >= 2
    assert not record.exists(), "no job ran"


def test_a_worker_that_cannot_load_handle_job_says_so_and_the_master_serves_others(
    procs: Processes, write_tasks, record, env, endpoint: str
):
    write_tasks(
        tasks(
            """
            if os.environ.get("TM_TEST_BROKEN_WORKER"):
                import a_module_this_machine_lacks

            def handle_job(job):
                record(job)
            """
        )
    )
    master = procs.start(
        "tm-master", "tasks.py", "n=300", "--address", endpoint, "--no-progress", env=env
    )
    # A machine without the tasks file, and one where it fails to import.
    missing = procs.run("tm-spawn", "elsewhere/tasks.py", "2", "--address", endpoint, env=env)
    broken = procs.run(
        "tm-spawn",
        "tasks.py",
        "2",
        "--address",
        endpoint,
        env={**env, "TM_TEST_BROKEN_WORKER": "1"},
    )
    for result, expected in ((missing, "no such file"), (broken, "a_module_this_machine_lacks")):
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0] and "tasks.py" in lines[0], result.stderr
        assert "Traceback" not in result.stderr
    assert master.poll() is None, "the master is still serving"
    good = procs.run("tm-spawn", "tasks.py", "2", "--address", endpoint, env=env)
    assert good.returncode == 0, good.stderr
    assert master.wait(timeout=30) == 0
    assert sorted(read_record(record)) == list(range(300))
