"""Shared fixtures: free loopback endpoints, temp state, real processes killed by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO

import pytest

BIN = Path(sys.executable).parent


class FakeClock:
    """A clock tests move by hand: ``clock.now += 1.5``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def tm_command(name: str) -> str:
    """The console script ``name`` next to this interpreter (falls back to PATH)."""
    candidate = BIN / name
    return str(candidate) if candidate.exists() else name


class Processes:
    """Start real tm commands; every process started is killed by PID in teardown."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, *args: str, env: dict[str, str] | None = None, **kwargs: object
    ) -> subprocess.Popen[bytes]:
        command = [tm_command(args[0]), *args[1:]]
        full_env = {**os.environ, **(env or {})}
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(
            command, cwd=self.cwd, env=full_env, start_new_session=True, **kwargs
        )  # type: ignore[call-overload]
        self.started.append(proc)
        return proc

    def run(
        self, *args: str, timeout: float = 60, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        proc = self.start(*args, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            out, err = proc.communicate()
            output = f"stdout:\n{out.decode()}\nstderr:\n{err.decode()}"
            raise AssertionError(f"{args} did not finish in {timeout}s\n{output}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the process group the command leads (its forked workers included)."""
        if proc.poll() is None or sig == signal.SIGKILL:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.started:
            # Forked workers share the group: SIGKILL the whole group, even if the leader exited.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(timeout=5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def no_secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TM_SECRET from the developer's shell leaks into the processes a test starts."""
    monkeypatch.delenv("TM_SECRET", raising=False)


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[Callable[[str], IO[bytes]]]:
    """``logs(name)``: a file in the test's directory to hand a process as its stderr."""
    with ExitStack() as stack:
        yield lambda name: stack.enter_context(open(tmp_path / name, "wb"))  # noqa: SIM115


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def write_tasks(tmp_path: Path) -> Callable[..., Path]:
    """Write a tasks file into the test's directory: ``write_tasks(source, name="tasks.py")``."""

    def write(source: str, name: str = "tasks.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write


RECORDING_TASKS = """
import os, sys

RECORD = os.environ["TM_TEST_RECORD"]

def get_jobs(n="1000", last=None, **kwargs):
    start = last if last is not None else 0
    for i in range(start, int(n)):
        yield i

def handle_job(job):
    # One line per run of a job, appended atomically (O_APPEND, one write): the test's
    # durable record of what ran, and where.
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{job} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)
"""


def read_record(path: Path) -> list[int]:
    """Job ids in the order they ran (from RECORDING_TASKS' record file)."""
    if not path.exists():
        return []
    return [int(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]
