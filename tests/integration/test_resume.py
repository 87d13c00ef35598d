"""Durable resume, end to end: stop or kill real tm processes, start them again, count runs.

Every handler appends ``<job> <pid>`` to a record file (one O_APPEND write per run), so the
tests assert on what ran, not on log lines. Re-runs after a SIGKILL are checked against what
the surviving checkpoint could not know: the jobs that had run (or were running) when the
master died but that the ledger did not list as done. A resume must re-run no more than those.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from taskmaster.errors import LedgerError
from taskmaster.ledger import CompletedSet, LedgerView
from tests.conftest import Processes, read_record, wait_until

pytestmark = pytest.mark.timeout(90)

TASKS = """
import os, time
from pathlib import Path

RECORD = os.environ["TM_TEST_RECORD"]
SLEEP = float(os.environ.get("TM_TEST_SLEEP", "0"))
GATE_JOB = int(os.environ.get("TM_TEST_GATE_JOB", "-1"))
GATE = os.environ.get("TM_TEST_GATE", "")

def get_jobs(n="1000", last=None):
    start = last if last is not None else 0
    for i in range(start, int(n)):
        yield i

def handle_job(job):
    if job == GATE_JOB:
        # Block until the test opens the gate (only the first run waits).
        started = Path(GATE + ".started")
        if not started.exists():
            started.write_text(str(os.getpid()))
            while not Path(GATE).exists():
                time.sleep(0.01)
    elif SLEEP:
        time.sleep(SLEEP)
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{job} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)
"""

NO_LAST_TASKS = TASKS.replace(
    'def get_jobs(n="1000", last=None):\n    start = last if last is not None else 0\n'
    "    for i in range(start, int(n)):",
    'def get_jobs(n="1000"):\n    for i in range(int(n)):',
)

# The 2012 article's own example: `last` is accepted and ignored, jobs come from a list.
ARTICLE_TASKS = TASKS.replace(
    'def get_jobs(n="1000", last=None):\n    start = last if last is not None else 0\n'
    "    for i in range(start, int(n)):\n        yield i",
    "values = list(range(int(os.environ['TM_TEST_N'])))\n\n"
    "def get_jobs(last=0):\n    for v in values:\n        yield v",
)


@pytest.fixture
def tasks(write_tasks, tmp_path: Path) -> dict[str, str]:
    """Write the recording tasks file; return the environment the handlers need."""
    write_tasks(TASKS)
    return {"TM_TEST_RECORD": str(tmp_path / "record.txt")}


def _record(tmp_path: Path) -> list[int]:
    return read_record(tmp_path / "record.txt")


def _checkpoint(state: Path) -> tuple[int, CompletedSet, dict[str, object]]:
    """(done, completed set, row) of the last committed checkpoint, read like `tm status`."""
    view = LedgerView(state)
    try:
        cp = view.checkpoint()
        row = {"in_flight": cp.in_flight, "rate": cp.rate, "updated": cp.updated}
        return cp.done, CompletedSet(cp.watermark, cp.ranges or []), row
    finally:
        view.close()


def _done_in_ledger(state: Path) -> int:
    try:
        return _checkpoint(state)[0]
    except Exception:  # not created yet
        return 0


def _unsaved(ran: list[int], completed: CompletedSet) -> int:
    """Jobs that had run when the master died but that the surviving checkpoint lacks."""
    return sum(1 for job in set(ran) if job not in completed)


def _within_one_interval(unsaved: int, row: dict[str, object], interval_s: float = 0.5) -> None:
    """The unsaved jobs are those in flight plus about one checkpoint interval's completions.

    The rate and in-flight count come from the last checkpoint before the kill. The slack
    (twice the interval plus a second) covers a master loop that a loaded machine delayed.
    """
    rate = float(row["rate"])  # type: ignore[arg-type]
    in_flight = int(row["in_flight"])  # type: ignore[call-overload]
    bound = in_flight + rate * (2 * interval_s + 1.0) + 100
    print(f"unsaved at the kill {unsaved:,} (in flight {in_flight:,}, rate {rate:,.0f}/s)")
    assert unsaved <= bound


def _reruns(ran: list[int]) -> int:
    return sum(count - 1 for count in collections.Counter(ran).values())


def _status(procs: Processes, *args: str) -> dict[str, object]:
    result = procs.run("tm", "status", "tasks.py", *args, "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def _sigkill_and_reap(procs: Processes, proc: subprocess.Popen[bytes]) -> None:
    procs.kill(proc, signal.SIGKILL)
    proc.wait(timeout=10)


def _kill_mid_run(
    procs: Processes, proc: subprocess.Popen[bytes], state: Path, tmp_path: Path, at_least: int
) -> tuple[list[int], CompletedSet, dict[str, object]]:
    """SIGKILL a whole tm-run (master and workers) once the ledger holds ``at_least`` done."""
    wait_until(lambda: _done_in_ledger(state) >= at_least or proc.poll() is not None, 30)
    assert proc.poll() is None, "the run finished before it could be killed: make it longer"
    _sigkill_and_reap(procs, proc)
    # The whole group is dead: nothing runs any more, the record is final for this master.
    wait_until(lambda: not _group_alive(proc.pid), 10)
    _, completed, row = _checkpoint(state)
    return _record(tmp_path), completed, row


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _assert_every_job_once_or_bounded(ran: list[int], n: int, bound: int) -> None:
    assert sorted(set(ran)) == list(range(n)), "every job ran"
    reruns = _reruns(ran)
    print(f"jobs {n:,}, runs {len(ran):,}, re-runs {reruns:,} (bound {bound:,})")
    assert reruns <= bound


# -- stop with SIGINT, restart -------------------------------------------------------------


def test_sigint_exits_130_and_a_restart_completes(
    procs: Processes, tasks: dict[str, str], tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    env = {**tasks, "TM_TEST_SLEEP": "0.0005"}
    args = ("tm-run", "tasks.py", "2", "n=12000", "--state", str(state), "--no-progress")
    proc = procs.start(*args, env=env)
    wait_until(lambda: _done_in_ledger(state) >= 2000 or proc.poll() is not None, 30)
    assert proc.poll() is None, "finished before the interrupt"
    procs.kill(proc, signal.SIGINT)  # to the group, as a terminal's Ctrl-C
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()
    assert "interrupted: resumable" in err.decode()
    assert "Traceback" not in err.decode()
    wait_until(lambda: not _group_alive(proc.pid), 10)  # no worker left behind
    first_run = _record(tmp_path)
    done, completed, _ = _checkpoint(state)
    assert 0 < done < 12000
    # A graceful stop checkpoints every acknowledged job: the ledger knows all that ran.
    assert _unsaved(first_run, completed) == 0, "a graceful stop loses no acknowledgement"

    again = procs.run(*args, env=env)
    assert again.returncode == 0, again.stderr
    ran = _record(tmp_path)
    _assert_every_job_once_or_bounded(ran, 12000, bound=0)
    status = _status(procs, "n=12000", "--state", str(state))
    assert status["done"] == 12000 and status["watermark"] == 12000 and status["complete"]


def test_a_lone_worker_stops_on_sigterm_as_on_ctrl_c(
    procs: Processes, tasks: dict[str, str], tmp_path: Path, endpoint: str
) -> None:
    env = {**tasks, "TM_TEST_SLEEP": "0.01"}
    master = procs.start("tm-master", "tasks.py", "n=5000", "--address", endpoint, env=env)
    worker = procs.start("tm-worker", "tasks.py", "--address", endpoint, env=env)
    wait_until(lambda: len(_record(tmp_path)) >= 5 or worker.poll() is not None, 30)
    procs.kill(worker, signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 130, err.decode()  # as tm-spawn, tm-run and tm-master
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    procs.kill(master, signal.SIGINT)
    assert master.wait(timeout=30) == 130


def test_a_finished_run_started_again_runs_nothing(
    procs: Processes, tasks: dict[str, str], tmp_path: Path
) -> None:
    args = ("tm-run", "tasks.py", "2", "n=500", "--no-progress")
    assert procs.run(*args, env=tasks).returncode == 0
    state = next((tmp_path / ".taskmaster").glob("tasks-*.db"))  # the default, per kwargs
    before = state.read_bytes()
    again = procs.run(*args, env=tasks)
    assert again.returncode == 0, again.stderr
    assert "already complete: 500 jobs done" in again.stderr
    assert len(_record(tmp_path)) == 500, "no job ran again"
    assert state.read_bytes() == before
    # The same through tm-master alone.
    master = procs.run("tm-master", "tasks.py", "n=500", "--no-progress", env=tasks, timeout=30)
    assert master.returncode == 0 and "already complete" in master.stderr


WAITING_TASKS = """
import os

def get_jobs(last=0):
    yield from range(last, 50)

def init_worker():
    # Before the worker's socket exists: from here it is trying to reach its master.
    open(os.path.join(os.environ["TM_TEST_READY"], f"worker-{os.getpid()}"), "w").close()

def handle_job(job):
    pass
"""


def test_workers_waiting_for_a_master_whose_run_is_complete_hear_it_is_over(
    procs: Processes, write_tasks, tmp_path: Path, endpoint: str
) -> None:
    write_tasks(WAITING_TASKS)
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {"TM_TEST_READY": str(ready)}
    master = ("tm-master", "tasks.py", "--address", endpoint, "--no-progress")
    spawn = ("tm-spawn", "tasks.py", "2", "--address", endpoint)
    workers = procs.start(*spawn, env=env)
    assert procs.run(*master, env=env, timeout=30).returncode == 0
    assert workers.wait(timeout=30) == 0
    for marker in ready.iterdir():
        marker.unlink()
    # The seed's commands again, workers first: they hear the run is over, and do not wait
    # out --wait (60 s) to exit 3.
    waiting = procs.start(*spawn, env=env)
    wait_until(lambda: len(list(ready.iterdir())) == 2 or waiting.poll() is not None, 30)
    again = procs.run(*master, env=env, timeout=30)
    assert again.returncode == 0 and "already complete: 50 jobs done" in again.stderr
    assert waiting.wait(timeout=10) == 0


def test_reset_starts_over_and_says_what_it_discarded(
    procs: Processes, tasks: dict[str, str], tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    args = ("tm-run", "tasks.py", "2", "n=300", "--state", str(state), "--no-progress")
    assert procs.run(*args, env=tasks).returncode == 0
    again = procs.run(*args, "--reset", env=tasks)
    assert again.returncode == 0, again.stderr
    line = next(x for x in again.stderr.splitlines() if "--reset" in x)
    assert "discarded the previous state" in line and str(state) in line
    assert "a complete run: 300 done, 0 failed, watermark 300" in line
    assert "done: 300 jobs" in again.stderr and "already complete" not in again.stderr
    assert collections.Counter(_record(tmp_path)) == {i: 2 for i in range(300)}


# -- SIGKILL mid-run, restart ---------------------------------------------------------------


def test_get_jobs_without_last_resumes_by_replay(
    procs: Processes, write_tasks, tmp_path: Path
) -> None:
    write_tasks(NO_LAST_TASKS)
    env = {"TM_TEST_RECORD": str(tmp_path / "record.txt"), "TM_TEST_SLEEP": "0.0005"}
    state = tmp_path / "state.db"
    args = ("tm-run", "tasks.py", "2", "n=12000", "--state", str(state), "--no-progress")
    proc = procs.start(*args, env=env)
    ran, completed, row = _kill_mid_run(procs, proc, state, tmp_path, at_least=3000)
    unsaved = _unsaved(ran, completed)
    _within_one_interval(unsaved, row)
    again = procs.run(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert "takes no `last`: replaying" in again.stderr
    assert "jobs/s) to reach the resume point" in again.stderr  # the rate is in the log
    _assert_every_job_once_or_bounded(_record(tmp_path), 12000, bound=unsaved)
    assert completed.watermark >= 2000, "the kill came after real progress"


def test_the_2012_example_that_ignores_last_is_resumed_by_replay(
    procs: Processes, write_tasks, tmp_path: Path
) -> None:
    write_tasks(ARTICLE_TASKS)
    env = {
        "TM_TEST_RECORD": str(tmp_path / "record.txt"),
        "TM_TEST_N": "12000",
        "TM_TEST_SLEEP": "0.0005",
    }
    state = tmp_path / ".taskmaster" / "tasks.db"  # the default: no kwargs
    args = ("tm-run", "tasks.py", "2", "--no-progress")
    proc = procs.start(*args, env=env)
    ran, completed, row = _kill_mid_run(procs, proc, state, tmp_path, at_least=3000)
    unsaved = _unsaved(ran, completed)
    again = procs.run(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert "it ignores `last`" in again.stderr
    final = _record(tmp_path)
    _assert_every_job_once_or_bounded(final, 12000, bound=unsaved)
    # What the resume could not avoid is what was in flight plus one checkpoint interval.
    _within_one_interval(unsaved, row)
    assert unsaved < len(set(ran)) / 2, "most of the work before the kill was kept"


def test_out_of_order_completion_is_resumed_without_rerunning_the_rest(
    procs: Processes, tasks: dict[str, str], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    env = {**tasks, "TM_TEST_GATE_JOB": "5", "TM_TEST_GATE": str(gate)}
    state = tmp_path / "state.db"
    args = ("tm-run", "tasks.py", "2", "n=20000", "--state", str(state), "--no-progress")
    proc = procs.start(*args, env=env)
    # Job 5 sleeps while the other worker finishes thousands after it.
    wait_until(lambda: _done_in_ledger(state) >= 5000 or proc.poll() is not None, 30)
    assert proc.poll() is None
    _, completed, _ = _checkpoint(state)
    assert completed.watermark <= 5 and 5 not in completed
    assert len(completed.ranges()) <= 3, completed.ranges()  # ranges, not one row per job
    ran, completed, _ = _kill_mid_run(procs, proc, state, tmp_path, at_least=5000)
    unsaved = _unsaved(ran, completed)
    assert 5 not in ran and len(set(ran)) >= 5000
    gate.write_text("open")
    again = procs.run(*args, env=env)
    assert again.returncode == 0, again.stderr
    final = _record(tmp_path)
    reruns = _reruns(final)
    _assert_every_job_once_or_bounded(final, 20000, bound=unsaved)
    assert reruns < 1000, f"{reruns} of {len(set(ran))} finished jobs ran again"


def test_a_long_job_does_not_hold_back_the_jobs_queued_behind_it(
    procs: Processes, tasks: dict[str, str], tmp_path: Path, logs
) -> None:
    # When job 1000 blocks, its worker holds a window of 1 ms jobs behind it (0.2 s of
    # them, in batches that start before it): it gives them back for the other worker
    # rather than keep them waiting behind the blocked one.
    gate = tmp_path / "gate"
    env = {**tasks, "TM_TEST_GATE_JOB": "1000", "TM_TEST_GATE": str(gate)}
    env["TM_TEST_SLEEP"] = "0.001"
    state = tmp_path / "state.db"
    args = ("tm-run", "tasks.py", "2", "n=4000", "--state", str(state), "--no-progress")
    log = tmp_path / "run.log"
    proc = procs.start(*args, "--log-level", "info", env=env, stderr=logs(log.name))
    # All but the blocked job: slow jobs are claimed one at a time.
    _all_but_the_held_run_then_the_rest(proc, tmp_path, log, n=4000, held=1)


def _all_but_the_held_run_then_the_rest(
    proc: subprocess.Popen[bytes], tmp_path: Path, log: Path, *, n: int, held: int
) -> None:
    """While the gate is closed, every job but the ``held`` ones runs, through a give-back;
    once it opens, the run ends with each job run once."""
    wait_until(lambda: len(_record(tmp_path)) >= n - held or proc.poll() is not None, 60)
    assert proc.poll() is None, "the held jobs hold the run open"
    assert "gave back" in log.read_text()
    (tmp_path / "gate").write_text("open")
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert sorted(_record(tmp_path)) == list(range(n)), "each job ran once"


# The first worker process to run a job is chosen: its first 19 jobs hang until the gate
# opens, whichever jobs the master sent it. The others take 10 ms.
HANGING_TASKS = TASKS.replace(
    "def handle_job(job):\n",
    """import threading
_lock = threading.Lock()
_hangs = None

def _hang_here():
    global _hangs
    with _lock:
        if _hangs is None:
            try:
                os.close(os.open(GATE + ".chosen", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                _hangs = 19
            except FileExistsError:
                _hangs = 0
        _hangs -= 1
        return _hangs >= 0

def handle_job(job):
    if _hang_here():
        while not Path(GATE).exists():
            time.sleep(0.01)
""",
)


def test_threads_held_by_long_jobs_give_back_the_jobs_the_free_ones_cannot_run_soon(
    procs: Processes, write_tasks, tmp_path: Path, logs
) -> None:
    # 19 of one worker's 20 threads hang. Its 20th thread alone would need seconds for the
    # window of 10 ms jobs that worker held: they go back, for the other worker.
    write_tasks(HANGING_TASKS)
    gate = tmp_path / "gate"
    env = {"TM_TEST_RECORD": str(tmp_path / "record.txt"), "TM_TEST_GATE": str(gate)}
    env["TM_TEST_SLEEP"] = "0.01"
    state = tmp_path / "state.db"
    args = ("tm-run", "tasks.py", "2", "n=6000", "--threads", "20", "--state", str(state))
    options = ("--no-progress", "--log-level", "info")
    log = tmp_path / "run.log"
    proc = procs.start(*args, *options, env=env, stderr=logs(log.name))
    _all_but_the_held_run_then_the_rest(proc, tmp_path, log, n=6000, held=19)


# -- refusals that change nothing -------------------------------------------------------------


def _readable(path: Path) -> bool:
    try:
        view = LedgerView(path)
    except LedgerError:
        return False
    view.close()
    return True


def _snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_a_corrupt_ledger_is_refused_clearly_and_left_alone(
    procs: Processes, tasks: dict[str, str], tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    args = ("tm-run", "tasks.py", "2", "n=100", "--state", str(state), "--no-progress")
    assert procs.run(*args, env=tasks).returncode == 0
    data = bytearray(state.read_bytes())
    data[:16] = b"not sqlite at al"  # the header: no longer an SQLite file
    state.write_bytes(bytes(data))
    before = _snapshot(state)
    record_before = _record(tmp_path)
    for command in (args, ("tm-master", "tasks.py", "n=100", "--state", str(state))):
        result = procs.run(*command, env=tasks, timeout=30)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert str(state) in lines[0] and "not a readable taskmaster state file" in lines[0]
        assert _snapshot(state) == before
        assert not Path(f"{state}-wal").exists()
    status = procs.run("tm", "status", "tasks.py", "--state", str(state), timeout=30)
    assert status.returncode == 2 and str(state) in status.stderr
    assert _record(tmp_path) == record_before, "nothing ran"
    assert _snapshot(state) == before


def test_a_second_master_on_the_same_ledger_is_refused(
    procs: Processes, tasks: dict[str, str], tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    gate = tmp_path / "gate"
    env = {**tasks, "TM_TEST_GATE_JOB": "0", "TM_TEST_GATE": str(gate)}
    first = procs.start(
        "tm-run", "tasks.py", "1", "n=10", "--state", str(state), "--no-progress", env=env
    )
    wait_until(lambda: Path(f"{gate}.started").exists(), 30)  # the first master holds the state
    wait_until(lambda: _readable(state), 30)  # and has written its tables (on a thread)
    before = _snapshot(state)
    second = procs.run("tm-master", "tasks.py", "n=10", "--state", str(state), env=env, timeout=30)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2, second.stderr
    assert len(lines) == 1, second.stderr
    assert f"pid {first.pid} on " in lines[0] and str(state) in lines[0]
    assert _snapshot(state) == before
    gate.write_text("open")
    assert first.wait(timeout=30) == 0
    assert sorted(_record(tmp_path)) == list(range(10))


# -- workers outlive the master ----------------------------------------------------------------


def test_workers_outlive_a_sigkilled_master(
    procs: Processes, tasks: dict[str, str], tmp_path: Path, endpoint: str
) -> None:
    gate = tmp_path / "gate"
    env = {**tasks, "TM_TEST_GATE_JOB": "3000", "TM_TEST_GATE": str(gate), "TM_TEST_SLEEP": "0.001"}
    state = tmp_path / "state.db"
    master_args = ("tm-master", "tasks.py", "n=6000", "--address", endpoint, "--state", str(state))
    master = procs.start(*master_args, "--no-progress", env=env)
    spawn = procs.start("tm-spawn", "tasks.py", "2", "--address", endpoint, env=env)
    # Job 3000 holds one worker; the master dies while that job runs.
    started = Path(f"{gate}.started")
    wait_until(lambda: started.exists() and _done_in_ledger(state) >= 3000, 30)
    _sigkill_and_reap(procs, master)
    done_at_kill = _done_in_ledger(state)
    workers = _worker_pids(tmp_path) | {started.read_text()}
    assert len(workers) == 2 and spawn.poll() is None, "the workers stay"

    master = procs.start(*master_args, "--no-progress", env=env)
    # The free worker reconnects and goes on (job 3000 runs again: the ledger never saw it
    # done); once the new master has made progress, let the blocked first run finish: its
    # acknowledgement reaches the new master for a job already done, a duplicate.
    wait_until(lambda: _done_in_ledger(state) >= done_at_kill + 300, 30)
    gate.write_text("open")
    _, master_err = master.communicate(timeout=60)
    assert master.returncode == 0, master_err.decode()
    assert spawn.wait(timeout=30) == 0
    ran = _record(tmp_path)
    assert sorted(set(ran)) == list(range(6000))
    assert collections.Counter(ran)[3000] >= 2
    assert _worker_pids(tmp_path) == workers, "the same two workers did it all, none respawned"
    status = _status(procs, "--state", str(state))
    assert status["done"] == 6000 and status["failed"] == 0
    assert status["duplicates"] >= 1


def _worker_pids(tmp_path: Path) -> set[str]:
    lines = (tmp_path / "record.txt").read_text().splitlines()
    return {line.split()[1] for line in lines}


@pytest.mark.parametrize("outage_s", [2.0, 5.0])
def test_a_restarted_master_hands_each_job_out_once(
    procs: Processes, tasks: dict[str, str], tmp_path: Path, endpoint: str, outage_s: float
) -> None:
    # Workers that waited through an outage have several frames queued for the new master
    # (heartbeats; past the 3 s liveness, HELLOs too); each stale one is answered "who are
    # you?" and must not turn into another HELLO that gets the jobs handed out for the first
    # one handed out (and run) again.
    env = {**tasks, "TM_TEST_SLEEP": "0.0005"}
    state = tmp_path / "state.db"
    master_args = ("tm-master", "tasks.py", "n=8000", "--address", endpoint, "--state", str(state))
    master = procs.start(*master_args, "--no-progress", env=env)
    spawn = procs.start("tm-spawn", "tasks.py", "2", "--address", endpoint, env=env)
    wait_until(lambda: _done_in_ledger(state) >= 1000, 30)
    _sigkill_and_reap(procs, master)
    outage = threading.Event()
    outage.wait(outage_s)  # the outage itself is the situation under test
    ran_before = _record(tmp_path)
    _, completed, _ = _checkpoint(state)
    unsaved = _unsaved(ran_before, completed)
    master = procs.start(*master_args, "--no-progress", env=env)
    _, err = master.communicate(timeout=60)
    assert master.returncode == 0, err.decode()
    assert spawn.wait(timeout=30) == 0
    ran = _record(tmp_path)
    after = collections.Counter(ran[len(ran_before) :])
    twice = sorted(job for job, count in after.items() if count > 1)
    assert not twice, f"{len(twice)} jobs ran twice under the new master: {twice[:20]}"
    _assert_every_job_once_or_bounded(ran, 8000, bound=unsaved)
