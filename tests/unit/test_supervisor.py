"""Supervisor with real forked children: restart, backoff, one exit status, signals.

Each child runs a tiny ``worker_main`` that leaves marks in the test's directory; the tests
step the supervisor by hand (``step(now)``, with a fake clock where time matters) or let
``run()`` block, and never sleep to synchronise.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskmaster import supervisor as supervisor_module
from taskmaster.supervisor import (
    BACKOFF_MAX_S,
    EXIT_INIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REPLACE,
    EXIT_WORKERS_FAILED,
    HEALTHY_AFTER_S,
    MAX_START_FAILURES,
    Supervisor,
)
from tests.conftest import FakeClock, wait_until

pytestmark = pytest.mark.timeout(30)


def mark(path: Path, text: str = "") -> None:
    """Append one line atomically: safe from several children at once."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()} {text}\n".encode())
    finally:
        os.close(fd)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


@pytest.fixture
def children() -> Iterator[list[int]]:
    """PIDs a test forked outside a Supervisor, and workers it learned of: killed in teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def settle(sup: Supervisor, clock: Callable[[], float], until: Callable[[], bool]) -> None:
    """Step ``sup`` until ``until()`` holds (children exit in real time)."""

    def stepped() -> bool:
        sup.step(clock())
        return until()

    wait_until(stepped, timeout=10, interval=0.005)


def stop_all(sup: Supervisor) -> None:
    sup.request_stop(signal.SIGKILL)
    settle(sup, time.monotonic, lambda: all(s.finished for s in sup.slots))


def test_a_crashed_worker_is_restarted(tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def main(index: int) -> int:
        mark(runs)
        if len(lines(runs)) == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the first one dies hard
        return EXIT_OK

    sup = Supervisor(1, main)
    assert sup.run() == EXIT_OK
    assert len(lines(runs)) == 2
    assert sup.slots[0].restarts == 1
    assert sup.slots[0].status == EXIT_OK


def next_delay(sup: Supervisor, clock: FakeClock) -> float:
    """Wait for the only worker to die; return the restart delay and restart it."""
    slot = sup.slots[0]
    pid, restarts = slot.pid, slot.restarts
    # A zero delay restarts it within the same step that reaps it.
    settle(sup, clock, lambda: slot.restart_at is not None or slot.restarts > restarts)
    if slot.restart_at is None:
        assert slot.pid != pid
        return 0.0
    delay = slot.restart_at - clock.now
    clock.now = slot.restart_at
    sup.step(clock.now)  # due: restarted
    assert slot.restart_at is None and slot.restarts == restarts + 1
    return delay


def test_backoff_grows_while_a_worker_keeps_dying_young(tmp_path: Path) -> None:
    clock = FakeClock()
    sup = Supervisor(1, lambda index: 1, clock=clock)
    sup.start()
    try:
        delays = [next_delay(sup, clock) for _ in range(8)]
        assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX_S]
        # A worker that lived long enough before dying is healthy again: restarted at once.
        clock.now += HEALTHY_AFTER_S  # before the step that reaps it
        assert next_delay(sup, clock) == 0.0
        assert next_delay(sup, clock) == 0.5
    finally:
        stop_all(sup)


def test_workers_whose_init_keeps_failing_give_up_saying_why(tmp_path: Path) -> None:
    starts = tmp_path / "starts"

    def main(index: int) -> int:
        slot = supervisor_module.child_slot()
        assert slot is not None
        mark(starts, f"{index} {slot.init_failed_before}")
        return EXIT_INIT_FAILED  # as a Worker does when init_worker() raises

    ticks = itertools.count()
    sup = Supervisor(2, main, clock=lambda: next(ticks) * 10.0)  # backoffs pass at once
    assert sup.run() == EXIT_INIT_FAILED, "not just 'the workers failed'"
    seen = [line.split()[1:] for line in lines(starts)]
    for index in ("0", "1"):
        said = [before for i, before in seen if i == index]
        # The first failure of a slot logs its traceback; the ones after it, one line.
        assert said == ["False"] + ["True"] * (MAX_START_FAILURES - 1)


def test_a_replaced_worker_comes_back_at_once_without_backoff(tmp_path: Path) -> None:
    clock = FakeClock()
    sup = Supervisor(1, lambda index: EXIT_REPLACE, clock=clock)
    sup.start()
    try:
        assert [next_delay(sup, clock) for _ in range(4)] == [0.0] * 4
        assert sup.slots[0].backoff_s == 0.0
    finally:
        stop_all(sup)


def test_the_statuses_a_worker_exits_with_are_the_ones_the_supervisor_reads() -> None:
    from taskmaster import worker

    assert EXIT_REPLACE == worker.EXIT_TIMEOUT
    assert EXIT_INIT_FAILED == worker.EXIT_INIT_FAILED
    assert worker.EXIT_GAVE_UP in supervisor_module.NO_RESTART


@pytest.mark.parametrize("status", [2, 3])
def test_deliberate_exits_are_not_restarted(tmp_path: Path, status: int) -> None:
    runs = tmp_path / "runs"

    def main(index: int) -> int:
        mark(runs)
        return status

    sup = Supervisor(2, main)
    assert sup.run() == EXIT_WORKERS_FAILED
    assert len(lines(runs)) == 2
    assert [s.restarts for s in sup.slots] == [0, 0]


def test_one_worker_hearing_the_end_ends_the_run_for_all(tmp_path: Path) -> None:
    up = tmp_path / "up"

    def main(index: int) -> int:
        if index == 0:
            # Wait for the others, so they are mid-"job" when the run ends.
            wait_until(lambda: len(lines(up)) == 2, timeout=10)
            return EXIT_OK
        mark(up)
        time.sleep(60)
        return 1

    sup = Supervisor(3, main)
    started = time.monotonic()
    assert sup.run() == EXIT_OK
    assert time.monotonic() - started < 10
    assert [s.status for s in sup.slots] == [EXIT_OK, EXIT_INTERRUPTED, EXIT_INTERRUPTED]
    assert all(s.restarts == 0 for s in sup.slots)


def run_until_interrupted(up: Path, told: Path) -> int:
    """A worker's "job": say it is up, run until interrupted, then say whether it was told
    the run is over."""
    mark(up)
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        mark(told, str(supervisor_module.run_over_told()))
        raise
    return 1


def test_the_others_are_told_the_run_is_over_not_just_stopped(tmp_path: Path) -> None:
    # So a worker that had not read its own END yet says no BYE to a master that is gone,
    # and does not linger trying to deliver one.
    up, told = tmp_path / "up", tmp_path / "told"

    def main(index: int) -> int:
        if index == 0:
            wait_until(lambda: len(lines(up)) == 1, timeout=10)
            return EXIT_OK
        return run_until_interrupted(up, told)

    assert Supervisor(2, main).run() == EXIT_OK
    assert [line.split()[1] for line in lines(told)] == ["True"]


def test_a_worker_told_the_run_is_over_as_it_leaves_still_exits_0(
    tmp_path: Path, children: list[int]
) -> None:
    # Seen with tm-run: the notice reached a worker that had heard END itself and was
    # flushing its output on the way out; its KeyboardInterrupt escaped into the
    # supervisor's frames, printed a traceback and made the worker exit 1.
    statuses = tmp_path / "statuses"

    class NoticeOnFlush:
        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            os.kill(os.getpid(), supervisor_module.RUN_OVER_SIGNAL)
            time.sleep(0)  # its handler runs here

    def main(index: int) -> int:
        sys.stdout = NoticeOnFlush()
        return EXIT_OK

    pid = os.fork()
    if pid == 0:  # a supervisor of our own: whatever escapes a worker ends here
        code = 99
        try:
            sup = Supervisor(1, main)
            code = sup.run()
            mark(statuses, " ".join(str(slot.status) for slot in sup.slots))
        finally:
            os._exit(code)
    children.append(pid)
    _, status = os.waitpid(pid, 0)
    children.remove(pid)
    assert os.waitstatus_to_exitcode(status) == EXIT_OK
    assert [line.split(" ", 1)[1] for line in lines(statuses)] == [str(EXIT_OK)]


def test_a_leaving_worker_is_not_interrupted_any_more(tmp_path: Path) -> None:
    # What Worker.run says as it starts its goodbyes: a stop now would only break them.
    def main(index: int) -> int:
        supervisor_module.leaving()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), supervisor_module.RUN_OVER_SIGNAL)
        time.sleep(0)  # the handlers run here, and raise nothing
        return EXIT_OK

    sup = Supervisor(1, main)
    assert sup.run() == EXIT_OK
    assert [slot.status for slot in sup.slots] == [EXIT_OK]


def test_a_stopped_worker_is_not_told_the_run_is_over(tmp_path: Path) -> None:
    up, told = tmp_path / "up", tmp_path / "told"
    sup = Supervisor(1, lambda index: run_until_interrupted(up, told))
    sup.start()
    wait_until(lambda: len(lines(up)) == 1, timeout=10)
    sup.request_stop(signal.SIGTERM)
    settle(sup, time.monotonic, lambda: all(s.finished for s in sup.slots))
    assert [line.split()[1] for line in lines(told)] == ["False"]


def test_sigterm_is_forwarded_to_every_worker(tmp_path: Path, children: list[int]) -> None:
    up, stopped = tmp_path / "up", tmp_path / "stopped"

    def main(index: int) -> int:
        mark(up, str(index))
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            mark(stopped, str(index))
            raise
        return 1

    pid = os.fork()
    if pid == 0:  # the supervisor process, as tm-spawn runs it
        status = 99
        try:
            sup = Supervisor(2, main)
            sup.install_signal_handlers()
            status = sup.run()
        finally:
            os._exit(status)
    children.append(pid)
    wait_until(lambda: len(lines(up)) == 2)
    children.extend(int(line.split()[0]) for line in lines(up))
    os.kill(pid, signal.SIGTERM)
    status = _wait_status(pid, timeout=10)
    assert status == EXIT_INTERRUPTED
    assert sorted(line.split()[1] for line in lines(stopped)) == ["0", "1"]
    assert len(lines(up)) == 2, "no worker was restarted after the stop"


def test_a_worker_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    up = tmp_path / "up"

    def main(index: int) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        mark(up)
        time.sleep(60)
        return 1

    sup = Supervisor(1, main, stop_grace_s=0.2)
    sup.start()
    try:
        settle(sup, time.monotonic, lambda: bool(lines(up)))
        sup.request_stop(signal.SIGTERM)
        settle(sup, time.monotonic, lambda: sup.slots[0].finished)
        assert sup.slots[0].status == 128 + signal.SIGKILL
        assert sup.slots[0].restarts == 0
    finally:
        stop_all(sup)


def test_workers_keep_an_ignored_sigint(tmp_path: Path) -> None:
    seen = tmp_path / "seen"

    def main(index: int) -> int:
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        mark(seen, "ignored" if ignored else "handled")
        return EXIT_OK

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert Supervisor(1, main).run() == EXIT_OK
    finally:
        signal.signal(signal.SIGINT, previous)
    assert Supervisor(1, main).run() == EXIT_OK
    assert [line.split()[1] for line in lines(seen)] == ["ignored", "handled"]


def test_workers_stop_when_the_parent_dies(tmp_path: Path, children: list[int]) -> None:
    up = tmp_path / "up"
    supervisor_pid = tmp_path / "supervisor"

    def main(index: int) -> int:
        mark(up)
        time.sleep(60)
        return 1

    parent = os.fork()
    if parent == 0:  # plays tm-run's master: forks the supervisor, then waits to be killed
        try:
            pid = os.fork()
            if pid == 0:
                status = 99
                try:
                    mark(supervisor_pid)
                    status = Supervisor(1, main, watch_parent=True).run()
                finally:
                    os._exit(status)
            time.sleep(60)
        finally:
            os._exit(0)
    children.append(parent)
    wait_until(lambda: lines(up) and lines(supervisor_pid))
    worker = int(lines(up)[0].split()[0])
    sup = int(lines(supervisor_pid)[0].split()[0])
    children.extend([worker, sup])
    os.kill(parent, signal.SIGKILL)
    os.waitpid(parent, 0)
    wait_until(lambda: gone(worker) and gone(sup), timeout=10)
    assert len(lines(up)) == 1, "the worker was not restarted"


def _wait_status(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} did not exit within {timeout}s")


def test_a_stop_before_a_slot_starts_leaves_it_unstarted(tmp_path: Path) -> None:
    # tm-run stops its supervisor as soon as the master fails (say, on a corrupt state file),
    # possibly between two forks of start(): a worker forked after the stop would never hear
    # it, and would be killed after the grace with a warning.
    up = tmp_path / "up"

    def main(index: int) -> int:
        mark(up, str(index))
        return 0

    sup = Supervisor(2, main)
    sup.request_stop(signal.SIGTERM)
    assert sup.run() == EXIT_OK
    assert all(slot.finished and slot.pid == 0 for slot in sup.slots)
    assert lines(up) == []
