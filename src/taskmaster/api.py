"""``taskmaster.run()``: a master and local workers from Python, for scripts and notebooks.

::

    import taskmaster

    def get_jobs():
        yield from range(100_000)

    def handle_job(n):
        ...

    if __name__ == "__main__":
        result = taskmaster.run(get_jobs, handle_job, workers=4)
        print(result.done, result.failed, result.duration_s)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .launch import run_all
from .options import EXIT_INTERRUPTED, EXIT_OK, MasterConfig, MasterOptions, WorkerOptions
from .serving import default_state_path

__all__ = ["RunResult", "run"]

Progress = Literal["auto", "rich", "log", "none"]


@dataclass(frozen=True)
class RunResult:
    """How a :func:`run` ended: the same facts as ``tm-run``'s final summary."""

    status: int
    """The exit status ``tm-run`` would give: 0 all done, 1 some jobs failed, 130 interrupted."""
    done: int
    """Jobs done, including those done before a resume."""
    failed: int
    """Jobs recorded as failed, with their tracebacks, in the state file (``tm failures``)."""
    duplicates: int
    """Completions ignored because the job was already done (re-runs after a crash)."""
    retried: int
    """Re-runs of jobs that raised (``retries``)."""
    duration_s: float
    """Wall time of this call."""
    state_path: str
    """The state file: run again with the same arguments to resume from it."""

    @property
    def ok(self) -> bool:
        """Every job done, none failed, not interrupted."""
        return self.status == EXIT_OK

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C or SIGTERM before the end: calling :func:`run` again resumes."""
        return self.status == EXIT_INTERRUPTED


def _default_name(get_jobs: Callable[..., Any]) -> str:
    module = getattr(get_jobs, "__module__", None) or "jobs"
    if module == "__main__":
        # Every script's functions live in __main__: name the state after the script instead,
        # so two scripts in one directory do not resume each other's runs.
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        module = Path(main_file).stem if main_file else "main"
    return f"{module}.{getattr(get_jobs, '__name__', 'get_jobs')}"


def run(
    get_jobs: Callable[..., Iterable[Any]],
    handle_job: Callable[[Any], Any],
    workers: int = 4,
    *,
    state: str | Path | None = None,
    kwargs: Mapping[str, str] | None = None,
    count_jobs: Callable[..., Any] | None = None,
    init_worker: Callable[[], Any] | None = None,
    size: int = 10_000,
    retries: int = 0,
    timeout: float | None = None,
    max_attempts: int = 3,
    max_job_bytes: int = 64 * 1024 * 1024,
    checkpoint_interval: float = 0.5,
    liveness: float = 3.0,
    total: int | None = None,
    threads: int = 1,
    concurrency: int = 1,
    reset: bool = False,
    retry_failed: bool = False,
    progress: Progress = "auto",
    workers_table: bool = False,
    name: str | None = None,
) -> RunResult:
    """Run ``handle_job`` on every job ``get_jobs(**kwargs)`` yields, on ``workers`` processes.

    What ``tm-run`` does, from Python, with the same guarantees. The options mean what the
    command-line options of the same names mean:

    - ``state``: the state file; default ``.taskmaster/<name>[-<kwargs hash>].db``, where
      ``name`` defaults to ``<module>.<get_jobs name>`` (the script's name for ``__main__``).
      Calling :func:`run` again after a crash or a Ctrl-C resumes from it; once a run is
      complete, calling again does nothing (``reset=True`` starts over).
    - ``kwargs``: passed to ``get_jobs`` and ``count_jobs``; each set has its own state.
    - ``count_jobs`` / ``total``: the number of jobs, for the percentage and the ETA.
    - ``init_worker``: called once in each worker process before its first job.
    - ``size``, ``retries``, ``timeout``, ``max_attempts``, ``max_job_bytes``,
      ``checkpoint_interval``, ``liveness``, ``threads``, ``concurrency``, ``retry_failed``:
      as ``--size``, ``--retries``, ``--timeout``, ``--max-attempts``, ``--max-job-bytes``,
      ``--checkpoint-interval``, ``--liveness``, ``--threads``, ``--concurrency``,
      ``--retry-failed``. An ``async def handle_job`` runs ``concurrency`` jobs at once.
    - ``progress``: ``"auto"`` (live on a terminal, a log line every few seconds otherwise),
      ``"rich"``, ``"log"`` or ``"none"`` (only the final summary); ``workers_table`` adds a
      row per worker to the live screen, as ``--workers-table``.

    Workers are forked from this process, so functions defined in a script's ``__main__``
    (or a notebook) work; jobs must be picklable. Returns a :class:`RunResult`; failed jobs
    do not raise, they are counted in ``failed`` and recorded in the state file.
    """
    label = name or _default_name(get_jobs)
    kw = dict(kwargs or {})
    state_path = Path(state) if state is not None else default_state_path(label, kw)
    config = MasterConfig(
        size=size, retries=retries, timeout_s=timeout, total=total, max_attempts=max_attempts,
        max_job_bytes=max_job_bytes, checkpoint_interval_s=checkpoint_interval,
        liveness_s=liveness,
    )  # fmt: skip
    master = MasterOptions(
        get_jobs=get_jobs,
        count_jobs=count_jobs,
        kwargs=kw,
        label=label,
        state_path=state_path,
        config=config,
        reset=reset,
        retry_failed=retry_failed,
        progress=progress,
        workers_table=workers_table,
        failures_hint=f"tm failures {label} --state {state_path}",
    )
    worker = WorkerOptions(
        handle_job=handle_job, init_worker=init_worker, threads=threads, concurrency=concurrency
    )
    outcome = run_all(master, worker, workers)
    s = outcome.summary
    if s is None:
        return RunResult(outcome.status, 0, 0, 0, 0, 0.0, str(state_path))
    return RunResult(
        outcome.status, s.done, s.failed, s.duplicates, s.retried, s.elapsed_s, s.state_path
    )
