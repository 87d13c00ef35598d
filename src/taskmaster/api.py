"""``taskmaster.run()``: a master and local workers from Python, for scripts and notebooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .launch import MasterOptions, WorkerOptions, run_all
from .master import EXIT_INTERRUPTED, EXIT_OK, MasterConfig


@dataclass(frozen=True)
class RunResult:
    """How a :func:`run` ended."""

    status: int  # the exit status tm-run would give: 0 ok, 1 some failed, 130 interrupted
    done: int
    failed: int
    duplicates: int
    retried: int
    duration_s: float
    state_path: str

    @property
    def ok(self) -> bool:
        return self.status == EXIT_OK

    @property
    def interrupted(self) -> bool:
        return self.status == EXIT_INTERRUPTED


def run(
    get_jobs: Callable[..., Iterable[Any]],
    handle_job: Callable[[Any], Any],
    workers: int = 4,
    *,
    state: str | Path | None = None,
    kwargs: dict[str, str] | None = None,
    count_jobs: Callable[..., Any] | None = None,
    init_worker: Callable[[], Any] | None = None,
    size: int = 10_000,
    retries: int = 0,
    timeout: float | None = None,
    total: int | None = None,
    threads: int = 1,
    concurrency: int = 1,
    reset: bool = False,
    retry_failed: bool = False,
    progress: str = "auto",
    name: str | None = None,
) -> RunResult:
    """Run ``handle_job`` on every job ``get_jobs(**kwargs)`` yields, on ``workers`` processes.

    Same guarantees as ``tm-run``: state in ``state`` (default ``.taskmaster/<name>.db``, where
    ``name`` defaults to ``get_jobs``' module and name), so calling it again after a crash or a
    Ctrl-C resumes. Workers are forked from this process, so functions defined in a script's
    ``__main__`` work. ``progress`` is ``"auto"``, ``"rich"``, ``"log"`` or ``"none"``.
    """
    label = name or f"{getattr(get_jobs, '__module__', 'jobs')}.{getattr(get_jobs, '__name__', 'get_jobs')}"
    config = MasterConfig(size=size, retries=retries, timeout_s=timeout, total=total)
    master = MasterOptions(
        get_jobs=get_jobs, count_jobs=count_jobs, kwargs=dict(kwargs or {}), label=label,
        state_path=Path(state) if state is not None else None, config=config, reset=reset,
        retry_failed=retry_failed, progress=progress,
        failures_hint="tm failures --state " + str(state) if state else "tm failures",
    )  # fmt: skip
    worker = WorkerOptions(handle_job=handle_job, init_worker=init_worker, threads=threads, concurrency=concurrency)
    outcome = run_all(master, worker, workers)
    s = outcome.summary
    if s is None:
        return RunResult(outcome.status, 0, 0, 0, 0, 0.0, "")
    return RunResult(outcome.status, s.done, s.failed, s.duplicates, s.retried, s.elapsed_s, s.state_path)
