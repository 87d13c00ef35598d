"""N worker processes: fork, reap, respawn with backoff, forward signals, one exit status.

The supervisor is single-threaded and holds no sockets, so forking from it is safe; each child
builds its own ZeroMQ context. Used by ``tm-spawn`` directly and by ``tm-run`` (in a child
forked before the master starts its threads).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import mmap
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_WORKERS_FAILED = 1
EXIT_INTERRUPTED = 130

# Exit statuses a worker uses on purpose (see worker.py and errors.py): the run is over, bad
# usage or configuration (restarting cannot fix it), it gave up on the master, or it was
# interrupted. None is a crash, so none is restarted.
NO_RESTART = {0, 2, 3, 130}
# A worker that left on purpose to be replaced (a job overran --timeout and cannot be
# interrupted in place): restarted at once, without growing the crash-loop backoff.
EXIT_REPLACE = 4
# init_worker() raised: restarted with backoff, but a slot whose worker cannot start this
# many times in a row gives up, so a broken setup ends the command instead of looping.
EXIT_INIT_FAILED = 5
MAX_START_FAILURES = 5
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
# A worker that lived this long before dying resets the crash-loop backoff.
HEALTHY_AFTER_S = 10.0
STOP_GRACE_S = 5.0
# Sent to the other workers once one exits 0 (it heard the master's END): the run is over.
# Not SIGTERM, so that a worker that had not read its own END yet leaves at once, without
# saying BYE to a master that is gone and lingering to deliver it (a second at one tm-run
# end in six with 8 workers on 2 cores): see run_over_told().
RUN_OVER_SIGNAL = signal.SIGUSR1


BLACK_BOX_FIELDS = 4  # running job id (-1 idle), its batch seq, worker identity, spare


class LastWords(NamedTuple):
    """What a dead worker was running, read from its black box by the supervisor."""

    identity: int
    job_id: int
    seq: int


class ChildSlot(NamedTuple):
    """Handed to a forked worker: its black box, its predecessor's last words, and whether
    its predecessor's init_worker() failed."""

    slot: int
    black_box: memoryview
    last_words: LastWords | None
    init_failed_before: bool = False


_child_slot: ChildSlot | None = None
_run_over_told = False
# Set as a forked worker's last step begins (flush, exit): a stop signal then has nothing
# left to interrupt, and an exception raised there would escape into the supervisor's frames.
_leaving = False


def child_slot() -> ChildSlot | None:
    """In a worker forked by a Supervisor: its slot; elsewhere ``None``."""
    return _child_slot


def leaving() -> None:
    """In a worker forked by a Supervisor: it is on its way out, so SIGTERM and the run-over
    notice no longer interrupt it (they would only break its goodbyes: a KeyboardInterrupt
    in a socket's finaliser, or in its last flush)."""
    global _leaving
    _leaving = True


def run_over_told() -> bool:
    """In a worker forked by a Supervisor: whether it was told the run is over (another
    worker heard the master's END), which interrupts it like SIGTERM."""
    return _run_over_told


class Slot:
    """One worker's place: the process in it now and its restart history."""

    __slots__ = (
        "index", "pid", "last_words", "started", "restarts", "start_failures", "backoff_s",
        "restart_at", "finished", "status",
    )  # fmt: skip

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.last_words: LastWords | None = None
        self.started = 0.0
        self.restarts = 0
        self.start_failures = 0
        self.backoff_s = 0.0
        self.restart_at: float | None = None
        self.finished = False
        self.status = 0


def _status_of(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


class Supervisor:
    """Run ``worker_main(index)`` in ``n`` forked children until each exits for good.

    A child killed by a signal or exiting with an unexpected status is restarted, with
    exponential backoff when it keeps dying young. ``watch_parent`` makes the supervisor stop
    its workers when the process that forked it dies (``tm-run``'s master).
    """

    def __init__(
        self,
        n: int,
        worker_main: Callable[[int], int],
        *,
        restart: bool = True,
        watch_parent: bool = False,
        stop_grace_s: float = STOP_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = [Slot(i) for i in range(n)]
        # Shared with the children: each worker writes the job it runs into its own fields
        # (one store per job), so when it dies the supervisor knows which job killed it.
        self._black_boxes = mmap.mmap(-1, 8 * BLACK_BOX_FIELDS * max(n, 1))
        self._boxes = memoryview(self._black_boxes).cast("q")
        for i in range(len(self._boxes)):
            self._boxes[i] = -1
        self.worker_main = worker_main
        self.restart = restart
        self.watch_parent = watch_parent
        self.stop_grace_s = stop_grace_s
        self._parent = os.getppid()
        self.clock = clock
        self.stopping = False
        self._stop_deadline = 0.0
        self.interrupted = False
        self.run_over = False

    def _spawn(self, slot: Slot) -> None:
        # Signals stay blocked across fork so a child never runs the parent's handlers.
        old = signal.pthread_sigmask(
            signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, RUN_OVER_SIGNAL}
        )
        try:
            if self.stopping:
                # A stop that came before this fork (say, between two slots of start())
                # signalled only the workers that existed then: do not start another.
                slot.finished = True
                return
            pid = os.fork()
            if pid == 0:  # the child
                status = 1
                try:
                    # An ignored SIGINT stays ignored (tm-run: the master decides when its
                    # workers stop, so a Ctrl-C to the whole group lets jobs finish).
                    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                        signal.signal(signal.SIGINT, signal.default_int_handler)
                    signal.signal(signal.SIGTERM, _terminate)
                    signal.signal(RUN_OVER_SIGNAL, _run_over)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                    global _child_slot
                    _child_slot = ChildSlot(
                        slot.index, self._box(slot.index), slot.last_words, slot.start_failures > 0
                    )
                    status = self.worker_main(slot.index)
                except KeyboardInterrupt:
                    status = EXIT_INTERRUPTED
                except SystemExit as exc:
                    status = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    logger.exception("worker crashed")
                    status = 1
                finally:
                    # First, before any call: a signal's handler runs only at one.
                    global _leaving
                    _leaving = True  # as leaving() does
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(status)
            # Recorded before signals are unblocked, so a stop requested by a signal that
            # arrived during the fork reaches this child too.
            slot.pid = pid
            slot.started = self.clock()
            slot.restart_at = None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        logger.debug("started worker pid=%d slot=%d", pid, slot.index)

    def _box(self, index: int) -> memoryview:
        first = index * BLACK_BOX_FIELDS
        return self._boxes[first : first + BLACK_BOX_FIELDS]

    def start(self) -> None:
        # The collector never walks what exists now, in here or in the workers: a walk
        # writes to every object it visits, and so would copy a worker's inherited pages.
        # Once, not at every respawn: what is frozen is never collected.
        gc.freeze()
        for slot in self.slots:
            self._spawn(slot)

    def pids(self) -> list[int]:
        return [s.pid for s in self.slots if s.pid and not s.finished]

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop restarting and pass the signal on to every worker."""
        if not self.stopping:
            self.stopping = True
            self._stop_deadline = self.clock() + self.stop_grace_s
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: object) -> None:
            self.interrupted = True
            self.request_stop(signal.SIGTERM)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def run(self) -> int:
        """Start the workers and block until all are finished; return the combined status."""
        # SIGCHLD stays pending while blocked, so a child's exit ends the wait at once.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        self.start()
        while True:
            self.step(self.clock())
            if all(s.finished for s in self.slots):
                break
            signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        if self.run_over:
            return EXIT_OK
        if self.interrupted:
            return EXIT_INTERRUPTED
        bad = [s for s in self.slots if s.status not in (0,)]
        if bad and all(s.start_failures >= MAX_START_FAILURES for s in self.slots):
            return EXIT_INIT_FAILED  # nothing ever ran: say why, not just that they failed
        return EXIT_WORKERS_FAILED if bad else EXIT_OK

    def step(self, now: float) -> None:
        """Reap dead children, restart the ones due, enforce the stop deadline."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self._reaped(pid, _status_of(wait_status), now)
        for slot in self.slots:
            if slot.restart_at is not None and now >= slot.restart_at and not self.stopping:
                slot.restarts += 1
                self._spawn(slot)
        if self.watch_parent and os.getppid() != self._parent and not self.stopping:
            logger.warning("the master is gone: stopping workers")
            self.request_stop(signal.SIGTERM)
        if self.stopping:
            for slot in self.slots:
                if slot.restart_at is not None:
                    slot.restart_at = None
                    slot.finished = True
            if now > self._stop_deadline:
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def _reaped(self, pid: int, status: int, now: float) -> None:
        slot = next((s for s in self.slots if s.pid == pid), None)
        if slot is None:
            return
        slot.status = status
        slot.pid = 0
        box = self._box(slot.index)
        slot.last_words = None
        if status not in (0, EXIT_INTERRUPTED) and box[0] >= 0:
            slot.last_words = LastWords(identity=box[2], job_id=box[0], seq=box[1])
            logger.warning("worker slot=%d died running job=%d", slot.index, box[0])
        box[0] = box[1] = box[2] = -1
        if status == 0 and not self.run_over:
            # One worker heard the master say the run is over: it is over for all of them,
            # including any that connected too late to hear it.
            self.run_over = True
            self.request_stop(RUN_OVER_SIGNAL)
        if self.stopping or not self.restart or status in NO_RESTART:
            slot.finished = True
            if status not in (0, EXIT_REPLACE, EXIT_INTERRUPTED, 128 + signal.SIGTERM):
                logger.warning("worker slot=%d exited with status %d", slot.index, status)
            return
        lived = now - slot.started
        slot.start_failures = slot.start_failures + 1 if status == EXIT_INIT_FAILED else 0
        if slot.start_failures >= MAX_START_FAILURES:
            logger.error(
                "worker slot=%d: init_worker() failed %d times in a row, giving up",
                slot.index,
                slot.start_failures,
            )
            slot.finished = True
            return
        if status == EXIT_REPLACE:
            logger.info("worker slot=%d left to be replaced after a job timeout", slot.index)
            slot.restart_at = now
            return
        if lived >= HEALTHY_AFTER_S or slot.last_words is not None:
            # A job killed it, not a broken start: restart at once, and the new worker
            # tells the master which job it was.
            slot.backoff_s = 0.0
        delay = slot.backoff_s
        slot.backoff_s = min(max(slot.backoff_s * 2, BACKOFF_START_S), BACKOFF_MAX_S)
        logger.warning(
            "worker slot=%d died (status %d) after %.1fs: restarting in %.1fs",
            slot.index,
            status,
            lived,
            delay,
        )
        slot.restart_at = now + delay


def _terminate(signum: int, frame: object) -> None:
    if not _leaving:
        raise KeyboardInterrupt


def _run_over(signum: int, frame: object) -> None:
    global _run_over_told
    _run_over_told = True
    if not _leaving:
        raise KeyboardInterrupt
