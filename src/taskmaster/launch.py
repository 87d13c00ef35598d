"""Assembling the parts: a master from options, workers, ``tm-spawn`` and ``tm-run``.

The CLI and the Python API both come here; this module neither parses argv nor exits.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import pickle
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import security
from .errors import TaskmasterError, UsageError
from .feeder import Feeder, safe_repr
from .ledger import CompletedSet, Ledger
from .master import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Master, MasterConfig
from .progress import Reporter, Summary, make_reporter
from .protocol import PROTOCOL_VERSION
from .supervisor import Supervisor, child_slot
from .targets import accepts_last

logger = logging.getLogger(__name__)

STATE_DIR = Path(".taskmaster")


def default_state_path(label: str, kwargs: dict[str, str]) -> Path:
    """``.taskmaster/<target>[-<kwargs hash>].db``: each set of kwargs resumes on its own."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    if kwargs:
        digest = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:10]
        name += f"-{digest}"
    return STATE_DIR / f"{name}.db"


@dataclass
class MasterOptions:
    get_jobs: Callable[..., Iterable[Any]]
    count_jobs: Callable[..., Any] | None = None
    kwargs: dict[str, str] = field(default_factory=dict)
    label: str = "tasks"
    source: str = ""  # the tasks file's absolute path, or the module's name
    state_path: Path | None = None
    address: str = security.DEFAULT_ADDRESS
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
    address: str = security.DEFAULT_ADDRESS
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


def _identity(options: MasterOptions) -> dict[str, Any]:
    identity = {"target": options.label, "kwargs": options.kwargs, "protocol": PROTOCOL_VERSION}
    if options.source:
        identity["source"] = options.source
    return identity


def _total(options: MasterOptions) -> int | None:
    if options.config.total is not None:
        return options.config.total
    if options.count_jobs is None:
        return None
    try:
        total = options.count_jobs(**options.kwargs)
        return int(total) if total is not None else None
    except Exception as exc:
        logger.warning(
            "count_jobs() failed, running without a total: %s: %s", type(exc).__name__, exc
        )
        return None


def _same_job(job: Any, payload: bytes, stored: bytes | None) -> bool:
    """Whether a freshly yielded job is the stored one (by pickle, else by equality)."""
    if stored is None:
        return False
    if payload == stored:
        return True
    # Equal values can pickle differently (sets, dicts built in another order).
    try:
        return bool(pickle.loads(stored) == job)
    except Exception:  # a user's __eq__ or an unpicklable class may raise anything
        return False


def _raising(exc: BaseException) -> Callable[[], Iterable[Any]]:
    """A job source that fails at once: the feeder reports it like any get_jobs error."""

    def jobs() -> Iterable[Any]:
        raise exc

    return jobs


def _resume_jobs(options: MasterOptions, ledger: Ledger) -> tuple[Callable[[], Iterable[Any]], int]:
    """Decide how to restart ``get_jobs``: return the iterable factory and the first id.

    With a stored resume job and a ``last`` parameter, ``get_jobs(last=job)`` must yield that
    job first and jobs are numbered from its id. Without ``last`` (or without a stored job),
    or when the generator starts over from its first job anyway (the 2012 article's
    ``get_jobs(last=0)`` ignores ``last``), jobs are numbered from 0 and the feeder skips the
    done prefix without running it.
    """
    cp = ledger.checkpoint_row
    kwargs = options.kwargs
    get_jobs = options.get_jobs
    if ledger.fresh or (cp.watermark == 0 and not cp.ranges):
        return (lambda: get_jobs(**kwargs)), 0
    if cp.resume_job is None or not accepts_last(get_jobs):
        why = "takes no `last`" if cp.resume_job is not None else "has no stored resume job"
        logger.warning(
            "get_jobs() %s: replaying %d done jobs from the start to resume", why, cp.watermark
        )
        return (lambda: get_jobs(**kwargs)), 0
    last = pickle.loads(cp.resume_job)
    try:
        jobs = iter(get_jobs(last=last, **kwargs))
        first = next(jobs)
    except StopIteration:
        logger.warning("get_jobs(last=%s) yielded nothing: no jobs left", safe_repr(last))
        return (lambda: iter(())), cp.resume_id
    except Exception as exc:  # the user's generator: the feeder reports it with the job id
        return _raising(exc), cp.resume_id
    try:
        first_payload = pickle.dumps(first, pickle.HIGHEST_PROTOCOL)
    except Exception:
        first_payload = b""  # unpicklable: the feeder records it as a bad job
    chained: Iterator[Any] = itertools.chain([first], jobs)
    if _same_job(first, first_payload, cp.resume_job):
        logger.info("resuming at job=%d (watermark %d)", cp.resume_id, cp.watermark)
        return (lambda: chained), cp.resume_id
    if _same_job(first, first_payload, cp.first_job):
        logger.warning(
            "get_jobs(last=…) started from the beginning again (it ignores `last`): "
            "replaying %d done jobs instead of re-running them",
            cp.watermark,
        )
        return (lambda: chained), 0
    logger.error(
        "get_jobs(last=%s) yielded %s first, which is neither the job to resume at nor the "
        "first job of the run: get_jobs must yield `last` first. Numbering jobs from %d as if "
        "it did; check the results",
        safe_repr(last),
        safe_repr(first),
        cp.resume_id,
    )
    return (lambda: chained), cp.resume_id


def serve_master(
    options: MasterOptions,
    *,
    on_bound: Callable[[str], None] | None = None,
    watchdog: Callable[[], str | None] | None = None,
) -> Outcome:
    """Run a master to completion (or interruption) and return its outcome."""
    security.check_libzmq()
    address = security.normalize_address(options.address)
    secret = options.secret or security.master_secret(address, options.secret_file)
    keys = security.derive_keys(secret)
    state_path = options.state_path or default_state_path(options.label, options.kwargs)
    reporter = make_reporter(
        options.progress, stream=options.stream, workers_table=options.workers_table
    )
    ledger = Ledger.open(state_path, _identity(options), reset=options.reset)
    try:
        return _serve(options, ledger, keys, address, reporter, on_bound, watchdog)
    finally:
        ledger.close()


def _describe_discarded(ledger: Ledger) -> str:
    old = ledger.discarded
    assert old is not None
    above = sum(e - s for s, e in old.ranges or [])
    state = "a complete run" if old.exhausted else "an unfinished run"
    return (
        f"discarded the previous state of {ledger.path} ({state}: {old.done:,} done, "
        f"{old.failed:,} failed, watermark {old.watermark:,} +{above:,} above it, "
        f"last checkpoint {old.updated}); starting over from the first job"
    )


def _already_complete(ledger: Ledger, reporter: Reporter, options: MasterOptions) -> Outcome:
    cp = ledger.checkpoint_row
    summary = Summary(
        done=cp.done, failed=cp.failed, duplicates=cp.duplicates, retried=cp.retried,
        elapsed_s=0.0, done_this_run=0, state_path=str(ledger.path),
        failures_hint=options.failures_hint, interrupted=False, already_complete=True,
    )  # fmt: skip
    reporter.finish(summary, None)
    return Outcome(EXIT_FAILED if cp.failed else EXIT_OK, summary)


def _serve(
    options: MasterOptions,
    ledger: Ledger,
    keys: security.Keys,
    address: str,
    reporter: Reporter,
    on_bound: Callable[[str], None] | None,
    watchdog: Callable[[], str | None] | None = None,
) -> Outcome:
    from .transport import MasterTransport

    cp = ledger.checkpoint_row
    if ledger.discarded is not None:
        logger.warning("--reset: %s", _describe_discarded(ledger))
    retrying: dict[int, int] | None = None
    config = options.config
    wake: list[Callable[[], None]] = []

    def on_ready() -> None:
        if wake:
            wake[0]()

    if options.retry_failed:
        failures = [f for f in ledger.failures() if f.job is not None]
        if not failures:
            logger.warning("no recorded failures with a stored job to retry")
        retrying = {f.job_id: f.attempts for f in failures}
        items = [(f.job_id, f.job) for f in failures if f.job is not None]
        feeder = Feeder(
            items,
            size=config.size,
            max_job_bytes=config.max_job_bytes,
            on_ready=on_ready,
            prepickled=True,
        )
    else:
        if cp.exhausted:
            return _already_complete(ledger, reporter, options)
        jobs, start_id = _resume_jobs(options, ledger)
        frozen = CompletedSet(ledger.completed.watermark, ledger.completed.ranges())
        feeder = Feeder(
            jobs, size=config.size, start_id=start_id, skip_below=frozen.watermark,
            skip=frozen.__contains__, skip_until=frozen.highest,
            max_job_bytes=config.max_job_bytes, on_ready=on_ready,
        )  # fmt: skip
        if config.total is None:
            config.total = _total(options)
    transport = MasterTransport(address, keys)
    wake.append(transport.wake)
    try:
        if on_bound is not None:
            on_bound(transport.address)
        logger.info("master listening on %s, state %s", transport.address, ledger.path)
        master = Master(
            transport,
            feeder,
            ledger,
            config,
            reporter=reporter,
            retry_attempts=retrying,
            failures_hint=options.failures_hint,
        )
        if retrying is not None:
            master.display_total = len(retrying)  # the run's own total stays in the ledger
        master.watchdog = watchdog
        master.install_signal_handlers()
        try:
            status = master.run()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        summary = master.summary()
        last = master.snapshot(master.clock())
        reporter.finish(summary, last)
        if feeder.failure is not None:
            logger.error(
                "get_jobs raised at job %d: the jobs before it are done; run the same command "
                "again to resume there\n%s",
                feeder.failure.job_id,
                feeder.failure.traceback,
            )
            status = status if status == EXIT_INTERRUPTED else EXIT_FAILED
        return Outcome(status, summary)
    finally:
        transport.close()


def run_worker(options: WorkerOptions) -> int:
    """One worker process until the master says the run is over."""
    from .worker import Worker

    security.check_libzmq()
    address = security.normalize_address(options.address)
    secret = options.secret or security.worker_secret(address, options.secret_file)
    slot = child_slot()  # set when a Supervisor forked this process
    died = slot.last_words if slot is not None else None
    worker = Worker(
        address, security.derive_keys(secret), options.handle_job,
        init_worker=options.init_worker, wait_s=options.wait_s,
        threads=options.threads, concurrency=options.concurrency,
        black_box=slot.black_box if slot is not None else None,
        predecessor_died=(died.identity, died.job_id, died.seq) if died else None,
    )  # fmt: skip
    return worker.run()


def _worker_main(options: WorkerOptions) -> Callable[[int], int]:
    def main(index: int) -> int:
        try:
            return run_worker(options)
        except TaskmasterError as exc:
            logger.error("worker: %s", exc)
            return exc.exit_status

    return main


def spawn_workers(options: WorkerOptions, n: int) -> int:
    """``tm-spawn``: N workers, restarted when one dies; the combined exit status."""
    if n < 1:
        raise UsageError("the number of workers must be at least 1")
    from . import worker as _preload  # noqa: F401  imported once here, not in each child

    security.check_libzmq()
    address = security.normalize_address(options.address)
    options.address = address
    options.secret = options.secret or security.worker_secret(address, options.secret_file)
    supervisor = Supervisor(n, _worker_main(options))
    supervisor.install_signal_handlers()
    return supervisor.run()


def run_all(master: MasterOptions, worker: WorkerOptions, n: int) -> Outcome:
    """``tm-run``: a master on a free loopback port plus N local workers, one exit status.

    The workers' supervisor is forked before the master starts any thread; it learns the
    master's address through a pipe once the master has bound its port.
    """
    if n < 1:
        raise UsageError("the number of workers must be at least 1")
    security.check_libzmq()
    from . import worker as _preload  # noqa: F401  imported once here, not in each child

    if master.address == security.DEFAULT_ADDRESS:
        # Our own free loopback port, and a fresh secret nobody else needs to know.
        master.address = "tcp://127.0.0.1:*"
        secret = master.secret or security.generate_secret()
    else:
        # Listening where others can reach: remote workers need the configured secret (and a
        # non-loopback address without one is refused, as for tm-master).
        address = security.normalize_address(master.address)
        secret = master.secret or security.master_secret(address, master.secret_file)
    master.secret = worker.secret = secret
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        _supervise_after_address(read_fd, worker, n)
    os.close(read_fd)

    def on_bound(address: str) -> None:
        os.write(write_fd, address.encode() + b"\n")
        os.close(write_fd)

    try:
        outcome = serve_master(master, on_bound=on_bound, watchdog=lambda: _workers_gone(pid))
    except BaseException:
        _stop_child(pid, wait_first_s=0.0)
        raise
    finally:
        _close_quietly(write_fd)
    # After END the workers leave by themselves; after an interruption they are told to.
    _stop_child(pid, wait_first_s=0.0 if outcome.status == EXIT_INTERRUPTED else 1.0)
    return outcome


def _workers_gone(pid: int) -> str | None:
    """tm-run's check that its worker supervisor still runs (without reaping it)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return "the workers are gone"
    if info is None:
        return None
    return f"all workers exited (status {info.si_status}) before the run finished"


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _supervise_after_address(read_fd: int, worker: WorkerOptions, n: int) -> None:
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides; then it stops us
        with os.fdopen(read_fd, "rb") as pipe:
            line = pipe.readline().decode().strip()
        if not line:
            os._exit(0)  # the master never bound: nothing to do
        worker.address = line
        supervisor = Supervisor(n, _worker_main(worker), watch_parent=True)

        def handler(signum: int, frame: object) -> None:
            supervisor.request_stop(signal.SIGTERM)

        signal.signal(signal.SIGTERM, handler)
        status = supervisor.run()
    except BaseException:
        logger.exception("worker supervisor failed")
    finally:
        os._exit(status)


def _stop_child(pid: int, wait_first_s: float) -> None:
    """Stop tm-run's worker supervisor (its workers were told the run is over or paused)."""
    import time

    deadline = time.monotonic() + wait_first_s
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.002)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
