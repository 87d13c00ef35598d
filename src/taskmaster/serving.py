"""A master from options: the state file, the feeder, the transport and the event loop.

``serve_master`` is ``tm-master``; ``tm-run`` and :func:`taskmaster.run` call it too, from
:mod:`taskmaster.launch`, after they have forked their workers.
"""

from __future__ import annotations

import itertools
import json
import logging
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ProtocolError, TaskmasterError
from .feeder import Feeder, safe_repr
from .launch import master_endpoint
from .master import Master
from .options import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, MasterOptions, Outcome
from .progress import Reporter, Summary, make_reporter
from .protocol import END_FRAME, PROTOCOL_VERSION, Hello, decode_from_worker
from .state import CompletedSet, FreshLedger
from .targets import accepts_last, check_kwargs
from .transport import MasterTransport

if TYPE_CHECKING:
    from .ledger import Ledger

logger = logging.getLogger(__name__)

STATE_DIR = Path(".taskmaster")
# How long a master whose run is already complete answers the workers waiting for it.
END_WAITING_S = 1.2


def default_state_path(label: str, kwargs: dict[str, str]) -> Path:
    """``.taskmaster/<target>[-<kwargs hash>].db``: each set of kwargs resumes on its own."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    if kwargs:
        import hashlib  # loads OpenSSL (2-3 ms): only when the path comes from kwargs

        digest = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:10]
        name += f"-{digest}"
    return STATE_DIR / f"{name}.db"


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


def _resume_jobs(
    options: MasterOptions, ledger: Ledger | FreshLedger
) -> tuple[Callable[[], Iterable[Any]], int]:
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
    transport: MasterTransport | None = None,
    watchdog: Callable[[], str | None] | None = None,
) -> Outcome:
    """Run a master to completion (or interruption) and return its outcome.

    ``transport`` is a socket already bound for this run (``tm-run`` binds first, so that its
    workers can connect while this module loads); without one, the master binds
    ``options.address`` once its state file is open.
    """
    try:
        # Refused (say, a reachable address without a secret, or key=value arguments
        # get_jobs cannot take) before the state is touched.
        endpoint = master_endpoint(options) if transport is None else None
        if not options.retry_failed:
            check_kwargs(options.get_jobs, options.kwargs)
        state_path = options.state_path or default_state_path(options.label, options.kwargs)
        reporter = make_reporter(
            options.progress, stream=options.stream, workers_table=options.workers_table
        )
        identity = _identity(options)
        # A run with no state yet creates it while serving (SQLite and the schema are about
        # 5 ms of every fresh start); a state file that exists is read before anything runs.
        ledger: Ledger | FreshLedger | None = FreshLedger.start(state_path, identity)
        if ledger is None:
            from .ledger import Ledger

            ledger = Ledger.open(state_path, identity, reset=options.reset)
        try:
            if ledger.checkpoint_row.exhausted and not options.retry_failed:
                outcome = _already_complete(ledger, reporter, options)
                if endpoint is not None:
                    _end_waiting_workers(endpoint)
                return outcome
            if transport is None:
                assert endpoint is not None
                transport = MasterTransport(*endpoint)
            return _serve(options, ledger, transport, reporter, watchdog)
        finally:
            # The socket's last goodbyes (END to every worker) and the state file's final
            # checkpoint and fsync both wait on the kernel: overlap them, 1-3 ms of every
            # run's end. The socket closes on a thread (nothing here touches it any more).
            closer = _close_in_background(transport)
            transport = None
            ledger.close()
            if closer is not None:
                closer.join()
    finally:
        if transport is not None:
            transport.close()


def _close_in_background(transport: MasterTransport | None) -> threading.Thread | None:
    if transport is None:
        return None

    def close() -> None:
        try:
            transport.close()
        except Exception:  # the run's outcome stands; the reason goes to the log
            logger.exception("closing the master's socket failed")

    closer = threading.Thread(target=close, name="taskmaster-close", daemon=True)
    closer.start()
    return closer


def _end_waiting_workers(endpoint: tuple[str, Any]) -> None:
    """Tell workers already waiting for this master (``tm-spawn`` started first) that the
    run is over, rather than leave them to give up after ``--wait``.

    A waiting worker retries its connection at least once a second, so that long is enough
    to hear from each; workers started later wait in vain, as for any master that is gone.
    """
    try:
        transport = MasterTransport(*endpoint)
    except TaskmasterError as exc:  # say, the port is taken: nothing to tell anyone
        logger.debug("not waiting for workers of the complete run: %s", exc)
        return
    try:
        deadline = time.monotonic() + END_WAITING_S
        while (left := deadline - time.monotonic()) > 0:
            transport.poll(left)
            for identity, frame in transport.receive():
                try:
                    message = decode_from_worker(frame)
                except ProtocolError:
                    continue
                if isinstance(message, Hello):
                    transport.send(identity, END_FRAME)
    finally:
        transport.close()


def _describe_discarded(ledger: Ledger | FreshLedger) -> str:
    old = ledger.discarded
    assert old is not None
    above = sum(e - s for s, e in old.ranges or [])
    state = "a complete run" if old.exhausted else "an unfinished run"
    return (
        f"discarded the previous state of {ledger.path} ({state}: {old.done:,} done, "
        f"{old.failed:,} failed, watermark {old.watermark:,} +{above:,} above it, "
        f"last checkpoint {old.updated}); starting over from the first job"
    )


def _already_complete(
    ledger: Ledger | FreshLedger, reporter: Reporter, options: MasterOptions
) -> Outcome:
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
    ledger: Ledger | FreshLedger,
    transport: MasterTransport,
    reporter: Reporter,
    watchdog: Callable[[], str | None] | None = None,
) -> Outcome:
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
        jobs, start_id = _resume_jobs(options, ledger)
        frozen = CompletedSet(ledger.completed.watermark, ledger.completed.ranges())
        feeder = Feeder(
            jobs, size=config.size, start_id=start_id, skip_below=frozen.watermark,
            skip=frozen.__contains__, skip_until=frozen.highest,
            max_job_bytes=config.max_job_bytes, on_ready=on_ready,
        )  # fmt: skip
        if config.total is None:
            if options.count_jobs is not None:
                ledger.prepare()  # count_jobs may take a while: the state file is made meanwhile
            config.total = _total(options)
    wake.append(transport.wake)
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
