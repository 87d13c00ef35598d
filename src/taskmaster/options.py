"""What a run is configured with: plain records that the CLI and the Python API fill in.

They live apart from the code that acts on them so that ``tm-run`` can parse its command
line and fork its workers before it imports the master's side (SQLite, the ledger, the
feeder), which then loads while the workers start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .security import DEFAULT_ADDRESS

if TYPE_CHECKING:
    from .progress import Summary

# A run's exit statuses (usage and security errors are 2, a worker giving up is 3).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


@dataclass
class MasterConfig:
    size: int = 10_000
    heartbeat_s: float = 0.5
    liveness_s: float = 3.0
    checkpoint_interval_s: float = 0.5
    timeout_s: float | None = None
    retries: int = 0
    max_attempts: int = 3
    max_job_bytes: int = 64 * 1024 * 1024
    grace_s: float = 3.0
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 30.0
    total: int | None = None


@dataclass
class MasterOptions:
    get_jobs: Callable[..., Iterable[Any]]
    count_jobs: Callable[..., Any] | None = None
    kwargs: dict[str, str] = field(default_factory=dict)
    label: str = "tasks"
    source: str = ""  # the tasks file's absolute path, or the module's name
    state_path: Path | None = None
    address: str = DEFAULT_ADDRESS
    secret: str | None = None
    secret_file: str | None = None
    config: MasterConfig = field(default_factory=MasterConfig)
    reset: bool = False
    retry_failed: bool = False
    progress: str = "auto"
    workers_table: bool = False
    failures_hint: str = "tm failures tasks.py"
    stream: Any = None


@dataclass
class WorkerOptions:
    handle_job: Callable[[Any], Any]
    init_worker: Callable[[], Any] | None = None
    address: str = DEFAULT_ADDRESS
    secret: str | None = None
    secret_file: str | None = None
    wait_s: float = 60.0
    threads: int = 1
    concurrency: int = 1


@dataclass
class Outcome:
    """What a master run ended with: the exit status and the summary shown."""

    status: int
    summary: Summary | None
