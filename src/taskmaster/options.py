"""What a run is configured with: plain records that the CLI and the Python API fill in.

They live apart from the code that acts on them so that ``tm-run`` can parse its command
line and fork its workers before it imports the master's side (SQLite, the ledger, the
feeder), which then loads while the workers start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .security import DEFAULT_ADDRESS, Keys

if TYPE_CHECKING:
    from .progress import Summary

# A run's exit statuses (usage and security errors are 2, a worker giving up is 3).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class MasterConfig:
    """How a master runs: its buffer, liveness, checkpoints and failure handling."""

    # Plain classes, not dataclasses, here and in the master's other records: generating
    # dataclass methods at import costs ~0.4 ms a class, on the critical path of every start.
    __slots__ = (
        "size", "heartbeat_s", "liveness_s", "checkpoint_interval_s", "timeout_s", "retries",
        "max_attempts", "max_job_bytes", "grace_s", "retry_backoff_s", "retry_backoff_max_s",
        "total", "expected_workers",
    )  # fmt: skip

    def __init__(
        self,
        *,
        size: int = 10_000,
        heartbeat_s: float = 0.5,
        liveness_s: float = 3.0,
        checkpoint_interval_s: float = 0.5,
        timeout_s: float | None = None,
        retries: int = 0,
        max_attempts: int = 3,
        max_job_bytes: int = 64 * 1024 * 1024,
        grace_s: float = 3.0,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 30.0,
        total: int | None = None,
        expected_workers: int | None = None,
    ) -> None:
        self.size = size
        self.heartbeat_s = heartbeat_s
        self.liveness_s = liveness_s
        self.checkpoint_interval_s = checkpoint_interval_s
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_attempts = max_attempts
        self.max_job_bytes = max_job_bytes
        self.grace_s = grace_s
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.total = total
        # tm-run's own workers, all starting now: see Master._state_due.
        self.expected_workers = expected_workers


class MasterOptions:
    """Everything ``serve_master`` needs: the job source, the state, the socket, the output."""

    def __init__(
        self,
        get_jobs: Callable[..., Iterable[Any]],
        *,
        count_jobs: Callable[..., Any] | None = None,
        kwargs: dict[str, str] | None = None,
        label: str = "tasks",
        source: str = "",
        state_path: Path | None = None,
        address: str = DEFAULT_ADDRESS,
        secret: str | None = None,
        secret_file: str | None = None,
        config: MasterConfig | None = None,
        reset: bool = False,
        retry_failed: bool = False,
        progress: str = "auto",
        workers_table: bool = False,
        failures_hint: str = "tm failures tasks.py",
        stream: Any = None,
    ) -> None:
        self.get_jobs = get_jobs
        self.count_jobs = count_jobs
        self.kwargs = kwargs if kwargs is not None else {}
        self.label = label
        self.source = source  # the tasks file's absolute path, or the module's name
        self.state_path = state_path
        self.address = address
        self.secret = secret
        self.secret_file = secret_file
        self.keys: Keys | None = None  # set by tm-run for a private run: no secret to derive
        self.config = config if config is not None else MasterConfig()
        self.reset = reset
        self.retry_failed = retry_failed
        self.progress = progress
        self.workers_table = workers_table
        self.failures_hint = failures_hint
        self.stream = stream


class WorkerOptions:
    """Everything a worker needs: the job handler and where its master is."""

    def __init__(
        self,
        handle_job: Callable[[Any], Any],
        *,
        init_worker: Callable[[], Any] | None = None,
        address: str = DEFAULT_ADDRESS,
        secret: str | None = None,
        secret_file: str | None = None,
        wait_s: float = 60.0,
        threads: int = 1,
        concurrency: int = 1,
    ) -> None:
        self.handle_job = handle_job
        self.init_worker = init_worker
        self.address = address
        self.secret = secret
        self.secret_file = secret_file
        self.keys: Keys | None = None  # as MasterOptions.keys
        self.wait_s = wait_s
        self.threads = threads
        self.concurrency = concurrency


class Outcome(NamedTuple):
    """What a master run ended with: the exit status and the summary shown."""

    status: int
    summary: Summary | None
