"""Processes: ``tm-spawn``'s supervised workers, one worker, and ``tm-run``'s whole run.

The CLI and the Python API both come here; this module neither parses argv nor exits. It
imports only what a worker needs: ``tm-run`` forks its workers first and lets the master's
side (:mod:`taskmaster.serving`, SQLite, the feeder) load while they start.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import time
from collections.abc import Callable

from . import (
    protocol,  # noqa: F401  both sides need it: loaded once, before tm-run's fork
    security,
)
from .errors import TaskmasterError, UsageError
from .options import EXIT_INTERRUPTED, MasterOptions, Outcome, WorkerOptions
from .supervisor import EXIT_INIT_FAILED, Supervisor, child_slot, leaving, run_over_told
from .transport import MasterTransport

logger = logging.getLogger(__name__)


def run_worker(options: WorkerOptions) -> int:
    """One worker process until the master says the run is over."""
    from .worker import Worker

    security.check_libzmq()
    address = security.normalize_address(options.address)
    keys = options.keys or security.derive_keys(
        options.secret or security.worker_secret(address, options.secret_file)
    )
    slot = child_slot()  # set when a Supervisor forked this process
    died = slot.last_words if slot is not None else None
    worker = Worker(
        address, keys, options.handle_job,
        init_worker=options.init_worker, wait_s=options.wait_s,
        threads=options.threads, concurrency=options.concurrency,
        black_box=slot.black_box if slot is not None else None,
        predecessor_died=(died.identity, died.job_id, died.seq) if died else None,
        run_over_told=run_over_told if slot is not None else None,
        leaving=leaving if slot is not None else None,
        init_failed_before=slot is not None and slot.init_failed_before,
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


def _load_worker_side(options: WorkerOptions) -> None:
    """Import the worker and what its executor needs once, in the parent of the workers."""
    from . import worker as _  # noqa: F401  not in tm-run's master: it loads after the fork
    from .executor import preload

    preload(options.handle_job)


def spawn_workers(options: WorkerOptions, n: int) -> int:
    """``tm-spawn``: N workers, restarted when one dies; the combined exit status."""
    if n < 1:
        raise UsageError("the number of workers must be at least 1")
    _load_worker_side(options)
    security.check_libzmq()
    address = security.normalize_address(options.address)
    options.address = address
    options.secret = options.secret or security.worker_secret(address, options.secret_file)
    supervisor = Supervisor(n, _worker_main(options))
    supervisor.install_signal_handlers()
    return supervisor.run()


def master_endpoint(options: MasterOptions) -> tuple[str, security.Keys]:
    """Where the master listens and its keys; a reachable address without a secret is refused."""
    security.check_libzmq()
    address = security.normalize_address(options.address)
    if options.keys is not None:
        return address, options.keys
    secret = options.secret or security.master_secret(address, options.secret_file)
    return address, security.derive_keys(secret)


def bind_master(options: MasterOptions) -> MasterTransport:
    """The master's socket, bound to ``options.address`` and keyed by the run's secret."""
    return MasterTransport(*master_endpoint(options))


def run_all(
    master: MasterOptions, worker: WorkerOptions, n: int, *, private: bool = True
) -> Outcome:
    """``tm-run``: a master on a free loopback port plus N local workers, one exit status.

    With ``private=False`` the master binds ``master.address`` (``tm-run --address``) and
    uses the configured secret, so that workers started elsewhere can join the run.

    The workers' supervisor is forked first, before the master starts any thread or loads
    its side; it learns the master's address through a pipe as soon as the port is bound,
    and its workers connect while the master opens the state file.
    """
    if n < 1:
        raise UsageError("the number of workers must be at least 1")
    security.check_libzmq()
    if private:
        # Our own free loopback port, and fresh keys nobody else needs to know.
        master.address = "tcp://127.0.0.1:*"
        if master.secret:
            worker.secret = master.secret
        else:
            master.keys = worker.keys = security.fresh_keys()
    else:
        # Listening where others can reach: remote workers need the configured secret (and a
        # non-loopback address without one is refused, as for tm-master).
        address = security.normalize_address(master.address)
        secret = master.secret or security.master_secret(address, master.secret_file)
        master.secret = worker.secret = secret
    master.config.expected_workers = n
    read_fd, write_fd = os.pipe()
    gc.freeze()  # see Supervisor.start
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        _supervise_after_address(read_fd, worker, n)
    os.close(read_fd)
    try:
        try:
            transport = bind_master(master)
            os.write(write_fd, transport.address.encode() + b"\n")
        finally:
            os.close(write_fd)  # unbound: the supervisor reads nothing and leaves
        from .serving import serve_master  # the master's side loads while workers connect

        outcome = serve_master(master, transport=transport, watchdog=lambda: _workers_gone(pid))
    except BaseException:
        _stop_child(pid, wait_first_s=0.0)
        raise
    # After END the workers leave by themselves; after an interruption they are told to.
    done_before = outcome.summary is not None and outcome.summary.already_complete
    stopped = outcome.status == EXIT_INTERRUPTED or done_before
    _stop_child(pid, wait_first_s=0.0 if stopped else 1.0)
    return outcome


def _workers_gone(pid: int) -> str | None:
    """tm-run's check that its worker supervisor still runs (without reaping it)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return "the workers are gone"
    if info is None:
        return None
    if info.si_status == EXIT_INIT_FAILED:
        return "no worker could start: init_worker() failed in each (see the log above)"
    return f"all workers exited (status {info.si_status}) before the run finished"


def _supervise_after_address(read_fd: int, worker: WorkerOptions, n: int) -> None:
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides; then it stops us
        _load_worker_side(worker)
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
    if _reaped_within(pid, wait_first_s):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if not _reaped_within(pid, 10.0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _reaped_within(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for child ``pid`` to exit; reap it and say whether it did."""
    if os.waitpid(pid, os.WNOHANG)[0]:
        return True
    if timeout_s <= 0:
        return False
    try:
        fd = os.pidfd_open(pid)  # readable when the child exits: no polling delay
    except (AttributeError, OSError):
        fd = -1
    deadline = time.monotonic() + timeout_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            if fd >= 0:
                select.select([fd], [], [], left)
            else:
                time.sleep(min(left, 0.002))
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        return False
    finally:
        if fd >= 0:
            os.close(fd)
