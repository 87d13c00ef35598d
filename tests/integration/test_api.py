"""``taskmaster.run()`` for real: a master and forked workers from inside this process."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import taskmaster
from taskmaster import launch

pytestmark = pytest.mark.timeout(30)

N = 200


def get_jobs(last=None):  # type: ignore[no-untyped-def]
    yield from range(last or 0, N)


def record_job(job: int) -> None:
    # One line per run, appended atomically: the durable record of what ran, in any process.
    fd = os.open(os.environ["TM_API_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{job}\n".encode())
    finally:
        os.close(fd)


def fail_on_sevens(job: int) -> None:
    record_job(job)
    if job % 7 == 0:
        raise ValueError(f"job {job} is a multiple of 7")


async def record_job_async(job: int) -> None:
    await asyncio.sleep(0)
    record_job(job)


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the jobs append their ids to, in a fresh working directory."""
    path = tmp_path / "record.txt"
    monkeypatch.setenv("TM_API_RECORD", str(path))
    monkeypatch.chdir(tmp_path)
    return path


def ran(record: Path) -> list[int]:
    return sorted(int(line) for line in record.read_text().split()) if record.exists() else []


def test_run_does_every_job(tmp_path: Path, record: Path) -> None:
    result = taskmaster.run(
        get_jobs, record_job, workers=2, state=tmp_path / "s.db", progress="none"
    )
    assert isinstance(result, taskmaster.RunResult)
    assert result.status == 0 and result.ok
    assert result.done == N and result.failed == 0
    assert result.state_path == str(tmp_path / "s.db")
    assert ran(record) == list(range(N))


def test_run_again_after_completion_does_nothing(
    tmp_path: Path, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "s.db"
    first = taskmaster.run(get_jobs, record_job, workers=1, state=state, progress="none")
    assert first.ok
    waits: list[float] = []
    stop_child = launch._stop_child

    def spy(pid: int, wait_first_s: float) -> None:
        waits.append(wait_first_s)
        stop_child(pid, wait_first_s)

    monkeypatch.setattr(launch, "_stop_child", spy)
    again = taskmaster.run(get_jobs, record_job, workers=1, state=state, progress="none")
    assert again.ok and again.done == N
    assert ran(record) == list(range(N)), "nothing ran twice"
    assert waits == [0.0], "its workers, told nothing, are stopped at once (not after 1 s)"


def test_run_reports_failures(tmp_path: Path, record: Path) -> None:
    result = taskmaster.run(
        get_jobs, fail_on_sevens, workers=2, state=tmp_path / "s.db", progress="none"
    )
    sevens = len(range(0, N, 7))
    assert result.status == 1 and not result.ok
    assert result.failed == sevens
    assert result.done == N - sevens


def die_on_five(job: int) -> None:
    record_job(job)
    if job == 5:
        os._exit(1)  # the worker process dies: its supervisor starts another


def test_run_takes_the_tm_run_options_as_keywords(tmp_path: Path, record: Path) -> None:
    result = taskmaster.run(
        get_jobs, die_on_five, workers=2, state=tmp_path / "s.db", progress="none",
        max_attempts=1, checkpoint_interval=0.1, liveness=5.0, size=50, workers_table=True,
    )  # fmt: skip
    assert (result.status, result.failed, result.done) == (1, 1, N - 1)
    assert ran(record).count(5) == 1, "failed at its first death (max_attempts=1)"


@pytest.mark.parametrize(
    ("handle", "options"),
    [(record_job, {"threads": 4}), (record_job_async, {"concurrency": 8})],
    ids=["threads", "async"],
)
def test_run_with_concurrent_executors(
    tmp_path: Path, record: Path, handle: object, options: dict[str, int]
) -> None:
    result = taskmaster.run(
        get_jobs, handle, workers=2, state=tmp_path / "s.db", progress="none", **options
    )
    assert result.ok and result.done == N
    assert ran(record) == list(range(N)), "every job ran exactly once"
