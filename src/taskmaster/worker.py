"""The worker: jobs on the main thread (or a pool), the socket on an I/O thread.

The I/O thread (:class:`Session`) owns the DEALER socket: it says HELLO, queues the batches
the master sends, sends heartbeats while a job runs, batches acknowledgements, grants credit
as slots free up, watches ``--timeout``, and survives a master restart (it keeps trying for
``--wait`` seconds, then gives up). The executor only sees a queue of batches and a box of
results.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import protocol
from .errors import ProtocolError, WorkerGaveUp
from .executor import (
    LOW_WATER_JOBS,
    Batch,
    JobQueue,
    Results,
    executor_slots,
    make_executor,
)
from .security import Keys
from .transport import HandshakeFailed, WorkerTransport

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_GAVE_UP = 3
EXIT_TIMEOUT = 4
EXIT_INIT_FAILED = 5

# Two full JOBS messages (master.MAX_BATCH): one running, one on its way.
MAX_WINDOW = 16384
# And at most this many pickled bytes (a window of big jobs that run fast would otherwise
# hold MAX_WINDOW of them, here and in the master's leases).
MAX_WINDOW_BYTES = 8 * 1024 * 1024
# Jobs this many times slower than the measured mean restart the measurement (Session._measure).
SLOWER_RESTART = 4.0
# How much queued work a worker asks for beyond its running slots. It must cover a round trip
# to the master, which is more than the network: while a CPU-bound job holds the GIL, the I/O
# thread waits up to the switch interval (5 ms) to send the ack, and again to take the reply.
# Beyond that, a longer prefetch means fewer messages: a grant is half of it, so each worker
# sends about 10 ACKs a second whatever its jobs take. Every message wakes the I/O thread,
# which takes the GIL from the running job, and the master, which takes a core from a worker;
# with 5 ms jobs on 2 cores, 30 ms of prefetch cost 2% of the run against this. The master
# shares out the end of a run by slots, and once little is left it holds each worker to its
# end window (ROUND_TRIP_S of prefetch: Master._share), so a long prefetch does not leave one
# worker with the last jobs while another idles.
PREFETCH_S = 0.2
# The prefetch that just covers a round trip: what a worker needs held at the end of a run.
ROUND_TRIP_S = 0.03
HELLO_RETRY_S = 1.0
# How often the I/O thread looks at the running job when --timeout is set. Otherwise it wakes
# only for traffic and heartbeats, not 20 times a second per worker for nothing: each wake-up
# takes the GIL from a running job (and a core from someone, on a machine full of idle
# workers). The start of a job the serial executor runs is when this thread first sees its
# id, so without --timeout a heartbeat's running time and the stuck test (GIVE_BACK_AFTER_S)
# may be up to one heartbeat late.
TIMEOUT_CHECK_S = 0.05
# How long a replacement whose init_worker() failed waits for the master's WELCOME, so that
# its last words and its BYE are delivered before it leaves.
WELCOME_WAIT_S = 1.0
# A slot whose job has run this long (and this many times the measured job time) is stuck:
# it gets no prefetch, and the jobs queued behind the stuck slots go back to the master for
# other workers when the free slots would not get through them soon (all of them when every
# slot is stuck): one job that hangs must not hold thousands of fast ones while others idle.
GIVE_BACK_AFTER_S = 1.0
GIVE_BACK_FACTOR = 20.0
# Well under the master's frame limit (protocol.MAX_WORKER_FRAME_BYTES).
ACK_BUDGET_BYTES = 1024 * 1024


class _DecayedMean:
    """A ratio of decayed sums (an amount over a count): each sample weighs by its count,
    and older ones fade by ``DECAY`` a sample."""

    __slots__ = ("amount", "count")
    DECAY = 0.7

    def __init__(self) -> None:
        self.amount = 0.0
        self.count = 0.0

    def add(self, amount: float, count: int) -> None:
        self.amount = self.DECAY * self.amount + amount
        self.count = self.DECAY * self.count + count

    @property
    def mean(self) -> float:
        return self.amount / self.count if self.count else 0.0


class Session(threading.Thread):
    """The worker's side of the conversation with one master (and its successors)."""

    def __init__(
        self,
        transport: WorkerTransport,
        queue: JobQueue,
        results: Results,
        wake_fd: int,
        *,
        slots: int,
        wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="taskmaster-io", daemon=True)
        self.transport = transport
        self.queue = queue
        self.results = results
        self._wake_fd = wake_fd
        self.slots = slots
        self.wait_s = wait_s
        self.clock = clock
        self.heartbeat_s = 0.5
        self.liveness_s = 3.0
        self.timeout_s: float | None = None
        self.epoch: int | None = None
        self.welcomed = False
        self.exit_status: int | None = None
        self.exit_message = ""
        self.received = 0
        self._job_bytes = _DecayedMean()  # pickled bytes a job, recently received
        self.granted = 0
        self.finished_seen = 0
        self.dropped = 0
        self.job_time_s = 0.0  # mean seconds of one slot per job, measured
        self._busy_seen = 0.0
        self._job_time = _DecayedMean()  # busy seconds a job: job_time_s
        self._last_from_master = clock()
        self._last_hello = -math.inf
        self._contact_deadline = clock() + wait_s
        self._next_heartbeat = 0.0
        self.stop_requested = False
        self._last_give_back = -math.inf
        self._stuck_at_finished = -1  # results.finished when we last gave jobs back
        # Jobs found running far longer than the others at the last heartbeat: id → start.
        self._stuck: dict[int, float] = {}
        # (identity, job id, seq) of the worker this process replaces, which died running
        # that job: said in HELLO so the master charges exactly that job.
        self.predecessor_died: tuple[int, int, int] | None = None
        self.served_run = ""  # which run (state file) the welcoming master serves
        self._held_acks: list[tuple[int, int, int]] = []
        self._held_failures: list[tuple[int, int, str, str, str]] = []
        self._seen_id = -1
        self._seen_since = 0.0
        # False while init_worker() runs in a worker that had last words to say: the
        # session is up (HELLO, heartbeats) but asks for no jobs yet, and --wait for a
        # master counts from when it is ready, as it would if it had connected then.
        self.ready = True
        self.welcome_heard = threading.Event()
        # transport.resets when we last said HELLO, and as of the session the master last
        # welcomed (a WELCOME read with a reset means the HELLO was before it: not as of now).
        self._resets_at_hello = 0
        self._resets_seen = 0

    # -- credit --------------------------------------------------------------------------

    def window(self, prefetch_s: float = PREFETCH_S) -> int:
        """Jobs we want held for us: running slots plus ``prefetch_s`` of their work.

        Slots stuck in a long job count for the job they hold, not for prefetch: 49 hung
        threads of 50 must not keep a window of 1,000 jobs for the 50th.
        """
        if not self.ready:
            return 0
        if self.results.finished == self._stuck_at_finished:
            return self.slots  # no job ended since we gave jobs back: hold nothing more
        if self.job_time_s <= 0:
            return self.slots * 2
        prefetch = int(prefetch_s * (self.slots - self._stuck_slots()) / self.job_time_s)
        window = min(self.slots + prefetch, MAX_WINDOW)
        if self._job_bytes.amount:
            fits = int(MAX_WINDOW_BYTES / self._job_bytes.mean)
            window = min(window, max(fits, self.slots))
        return window

    def _stuck_after_s(self) -> float:
        """How long a job runs before its slot counts as stuck."""
        return max(GIVE_BACK_AFTER_S, GIVE_BACK_FACTOR * self.job_time_s)

    def _note_stuck(self, now: float, running: dict[int, tuple[float, int]]) -> None:
        """Find the slots held by a job far longer than jobs take (none before one ended)."""
        if self.job_time_s <= 0:
            self._stuck = {}
            return
        after = self._stuck_after_s()
        self._stuck = {i: t for i, (t, _) in running.items() if now - t >= after}

    def _stuck_slots(self) -> int:
        """How many of the jobs found stuck at the last heartbeat still run (the same runs:
        a job that ended and came back is not stuck)."""
        if not self._stuck:
            return 0
        results = self.results
        running, current = results.running, results.current_id
        stuck = 0
        for job_id, started in self._stuck.items():
            if job_id == current:
                stuck += started == self._seen_since
            else:
                entry = running.get(job_id)  # read once: an executor thread may remove it
                stuck += entry is not None and entry[0] == started
        return stuck

    def _finished(self) -> int:
        return self.results.finished + self.dropped

    def _grant_step(self, window: int) -> int:
        """The least credit worth a message on its own: half the prefetch."""
        return max(1, (window - self.slots) // 2)

    def _grant(self, window: int | None = None) -> int:
        """Credit to grant now: the window minus what the master may still send or we hold."""
        if window is None:
            window = self.window()
        claim = self.granted - self._finished()
        grant = window - claim
        if grant >= self._grant_step(window) or (grant > 0 and claim < self.slots):
            self.granted += grant
            return grant
        return 0

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._send_hello(self.clock())
            while self.exit_status is None and not self.stop_requested:
                readable = self.transport.poll(self._poll_timeout(self.clock()))
                now = self.clock()
                if readable:
                    for frame in self.transport.receive():
                        self.handle(frame, now)
                self._check_reset(now)
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(self._wake_fd, 4096)
                self._flush(now)
                self._tick(now)
                if self.timeout_s is not None:
                    self._check_timeout(now, self._running(now))
        except HandshakeFailed as exc:
            self._give_up(EXIT_GAVE_UP, str(exc))
        except Exception as exc:  # never die silently: the main thread reports it
            logger.exception("worker I/O thread failed")
            self._give_up(EXIT_GAVE_UP, f"worker I/O failed: {exc}")
        finally:
            self.queue.close()

    def _check_reset(self, now: float) -> None:
        """After the connection to the master broke, start a fresh session: what either
        side sent on the old one may be lost (JOBS the master would hold as ours forever,
        credit we would wait on), and the master requeues what we held when we say HELLO."""
        reset = self.transport.resets != self._resets_seen
        if reset and self.welcomed and self.exit_status is None:  # (not the end of a run)
            self._lost_master(now, "the connection to the master was reset", at_once=True)

    def _poll_timeout(self, now: float) -> float:
        """How long to wait for traffic: until the next heartbeat, or a --timeout check."""
        wake_at = self._next_heartbeat
        if not self.welcomed:
            wake_at = min(wake_at, self._last_hello + HELLO_RETRY_S)
        timeout = max(0.0, wake_at - now)
        if self.timeout_s is not None:
            timeout = min(timeout, TIMEOUT_CHECK_S)
        return timeout

    def _give_up(self, status: int, message: str) -> None:
        self.exit_status = status
        self.exit_message = message

    def handle(self, frame: bytes, now: float) -> None:
        try:
            msg = protocol.unpack_from_master(frame)
        except (ProtocolError, ValueError) as exc:
            logger.warning("ignored a malformed frame from the master: %s", exc)
            return
        self._last_from_master = now
        kind = msg[0]
        if kind == protocol.JOBS:
            _, seq, ids, payloads, counts = msg
            batch = Batch(seq, ids, payloads, protocol.job_count(counts), isinstance(counts, list))
            self.received += batch.count
            self._job_bytes.add(sum(map(len, payloads)), batch.count)  # for MAX_WINDOW_BYTES
            self.queue.put(batch)
        elif kind == protocol.PING:
            if self.welcomed and msg[1] != self.epoch:
                self._lost_master(now, "a new master answered")
        elif kind == protocol.PROBE:
            self._next_heartbeat = now  # a worker died somewhere: show we are alive
        elif kind == protocol.WELCOME:
            self._welcome(msg, now)
        elif kind == protocol.END:
            logger.info("the run is over")
            self.exit_status = EXIT_OK
        elif kind == protocol.PAUSE:
            self._lost_master(now, "the master is stopping")
        elif kind == protocol.REHELLO:
            # A REHELLO soon after our HELLO answers a frame sent before it: already handled.
            if now - self._last_hello >= HELLO_RETRY_S:
                self._lost_master(now, "the master does not know us (restarted?)")
        elif kind == protocol.REFUSE:
            self._give_up(EXIT_GAVE_UP, f"the master refused this worker: {msg[1]}")

    def _welcome(self, msg: list[Any], now: float) -> None:
        _, version, epoch, config = msg
        if version != protocol.PROTOCOL_VERSION:
            self._give_up(
                EXIT_GAVE_UP,
                f"the master speaks protocol {version}, this worker "
                f"{protocol.PROTOCOL_VERSION}: run the same taskmaster version",
            )
            return
        if self.epoch is not None and epoch != self.epoch:
            logger.info("reconnected to a new master (epoch %d)", epoch)
        self.epoch = epoch
        self.welcomed = True
        self.welcome_heard.set()
        self._resets_seen = self._resets_at_hello
        self.predecessor_died = None  # told
        run = str(config.get("run", ""))
        held_acks, held_failures = self._held_acks, self._held_failures
        self._held_acks, self._held_failures = [], []
        if held_acks or held_failures:
            if run == self.served_run:
                # A restarted master of the same run: these jobs are done (or failed) there.
                self._send_acks(0, _merge(held_acks), held_failures)
            else:
                logger.info(
                    "dropped %d results of another run", len(held_acks) + len(held_failures)
                )
        self.served_run = run
        self.heartbeat_s = float(config.get("heartbeat_s", self.heartbeat_s))
        self.liveness_s = float(config.get("liveness_s", self.liveness_s))
        timeout = config.get("timeout_s")
        self.timeout_s = float(timeout) if timeout else None

    def _lost_master(self, now: float, why: str, *, at_once: bool = False) -> None:
        """Forget what the old master sent but we have not started, and say HELLO again
        (``at_once``: now, not HELLO_RETRY_S after the last one; it goes out on reconnect)."""
        if self.welcomed:
            logger.warning("%s: waiting up to %.0fs for a master", why, self.wait_s)
        self.welcomed = False
        # The rest of the running batch too: the master sends it all out again.
        self.dropped += self.queue.drop_unstarted()
        self._contact_deadline = now + self.wait_s
        if at_once or now - self._last_hello >= HELLO_RETRY_S:
            self._send_hello(now)

    def _send_hello(self, now: float) -> None:
        self._flush(now)
        held = max(self.received - self._finished(), 0)
        credit = max(0, self.window() - held)
        self.granted = self._finished() + held + credit
        hello = protocol.hello(
            os.uname().nodename, os.getpid(), self.slots, credit, self.predecessor_died
        )
        self.transport.send(hello)
        self._last_hello = now
        self._resets_at_hello = self.transport.resets

    def _flush(self, now: float) -> None:
        """Send finished jobs and fresh credit in one ACK."""
        results = self.results
        acks: list[tuple[int, int, int]] = []
        failures: list[tuple[int, int, str, str, str]] = []
        ok, failed = results.ok, results.failed
        while ok:
            acks.append(ok.popleft())
        while failed:
            failures.append(failed.popleft())
        self._measure()
        # Ask for more while half the window is still queued: the next jobs arrive while
        # these run, rather than after the queue ran dry.
        window = self.window()
        self.queue.low_water = max(LOW_WATER_JOBS, window // 2 + 1)
        self.queue.post_every = self._grant_step(window)
        if not self.welcomed:
            # No master now: keep the results for the next one, if it serves the same run.
            self._held_acks.extend(acks)
            self._held_failures.extend(failures)
            return
        credit = self._grant(window)
        if acks or failures or credit:
            self._send_acks(credit, _merge(acks), failures, self.window(ROUND_TRIP_S))

    def _send_acks(
        self,
        credit: int,
        acks: list[tuple[int, int, int]],
        failures: list[tuple[int, int, str, str, str]],
        end_window: int = 0,
    ) -> None:
        """One ACK, or several when failures' tracebacks would pass the master's frame limit."""
        batch: list[tuple[int, int, str, str, str]] = []
        size = 0
        for failure in failures:
            weight = 64 + sum(len(text.encode()) for text in failure[2:])
            if batch and size + weight > ACK_BUDGET_BYTES:
                self.transport.send(protocol.ack(0, [], batch))
                batch, size = [], 0
            batch.append(failure)
            size += weight
        self.transport.send(protocol.ack(credit, acks, batch, end_window))

    def _measure(self) -> None:
        """Update the mean duration of one job from what finished since the last look."""
        finished = self.results.finished
        jobs = finished - self.finished_seen
        if jobs <= 0:
            return
        busy = self.results.busy_s - self._busy_seen
        self.finished_seen = finished
        self._busy_seen = self.results.busy_s
        # Each sample weighs by its jobs: the first two jobs of a run (a cold start: imports,
        # caches) no longer hold the window small for a dozen acks once thousands of fast
        # ones have been measured. But jobs that turn much slower start it afresh: thousands
        # of fast ones would otherwise keep the window wide while slow jobs pile up in it.
        if busy / jobs > SLOWER_RESTART * self._job_time.mean:
            self._job_time = _DecayedMean()
        self._job_time.add(busy, jobs)
        self.job_time_s = max(self._job_time.mean, 1e-7)

    def _tick(self, now: float) -> None:
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.heartbeat_s
            running = self._running(now)
            if running:
                job_id, (started, _) = min(running.items(), key=lambda item: item[1][0])
                self.transport.send(
                    protocol.heartbeat(job_id, now - started, self.results.finished)
                )
                self._note_stuck(now, running)
                if self.welcomed:
                    self._give_back_if_stuck(now, running)
            else:
                self._stuck = {}
                self.transport.send(protocol.heartbeat(-1, 0.0, self.results.finished))
        if self.welcomed:
            if now - self._last_from_master > self.liveness_s:
                self._lost_master(now, "no word from the master")
            else:
                self._contact_deadline = now + self.wait_s
        else:
            if not self.ready:
                self._contact_deadline = now + self.wait_s
            if now >= self._contact_deadline:
                self._give_up(
                    EXIT_GAVE_UP,
                    f"no master answered at {self.transport.address} "
                    f"within --wait {self.wait_s:.0f}s",
                )
            elif now - self._last_hello >= HELLO_RETRY_S:
                self._send_hello(now)

    def _give_back_if_stuck(self, now: float, running: dict[int, tuple[float, int]]) -> None:
        """Send the master the jobs queued here if the slots not held by long jobs would
        take more than ``GIVE_BACK_AFTER_S`` plus a prefetch to get through them (always,
        when every slot is held)."""
        stuck = len(self._stuck)  # as _note_stuck found them just now
        if not stuck or now - self._last_give_back < GIVE_BACK_AFTER_S:
            return
        waiting = self.received - self._finished() - len(running)
        if waiting <= 0:
            return  # nothing waits behind them
        free = self.slots - stuck
        if free and waiting * self.job_time_s / free < GIVE_BACK_AFTER_S + PREFETCH_S:
            return  # the other slots get through it soon enough
        finished = self.results.finished  # before: a job that ends meanwhile frees a slot
        returned: list[tuple[int, int, int]] = []
        for batch, offset in self.queue.take_back():
            ids = batch.id_seq()
            if isinstance(ids, range):
                returned.append((batch.seq, ids.start + offset, batch.count - offset))
            else:
                returned.extend((batch.seq, job_id, 1) for job_id in ids[offset:])
        if not returned:
            return
        returned = _merge(returned)
        count = sum(run[2] for run in returned)
        self.dropped += count
        self._last_give_back = now
        self._stuck_at_finished = finished
        # Anything more the master sent would queue behind the same jobs: the credit it has
        # not used is void, on both sides. The master takes off exactly what we do, so the
        # two stay in step: jobs it sent before it reads this leave both below 0 when they
        # come (and a later give-back of those brings both back to 0).
        voided = self.granted - self.received
        self.granted = self.received
        logger.info(
            "gave back %d queued jobs: %d of %d slots busy with one job for %.1fs or more",
            count,
            stuck,
            self.slots,
            self._stuck_after_s(),
        )
        self.transport.send(protocol.give_back(returned, voided))

    def _running(self, now: float) -> dict[int, tuple[float, int]]:
        """Jobs running now: job id → (start time, batch seq)."""
        results = self.results
        current = results.current_id
        if current != self._seen_id:
            # The serial executor only names its job; its start is when we first saw it.
            self._seen_id, self._seen_since = current, now
        running = results.running.copy()
        if current >= 0:
            running[current] = (self._seen_since, results.current_seq)
        return running

    def _check_timeout(self, now: float, running: dict[int, tuple[float, int]]) -> None:
        if self.timeout_s is None or not running:
            return
        for job_id, (started, seq) in running.items():
            if now - started > self.timeout_s:
                logger.error(
                    "job=%d ran past --timeout %gs: replacing this worker", job_id, self.timeout_s
                )
                self._flush(now)
                message = f"ran longer than --timeout {self.timeout_s:g}s"
                self.transport.send(protocol.ack(0, [], [(seq, job_id, "Timeout", message, "")]))
                self.transport.send(protocol.bye("timeout"))
                # The job cannot be interrupted safely in place: flush and leave the process;
                # the supervisor starts a fresh worker.
                self.transport.close(linger_s=2.0)
                logging.shutdown()
                os._exit(EXIT_TIMEOUT)


def _merge(acks: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Join consecutive runs of the same batch, so an ACK carries few entries."""
    if len(acks) < 2:
        return acks
    merged = [acks[0]]
    for seq, first, count in acks[1:]:
        last_seq, last_first, last_count = merged[-1]
        if seq == last_seq and last_first + last_count == first:
            merged[-1] = (seq, last_first, last_count + count)
        else:
            merged.append((seq, first, count))
    return merged


class Worker:
    """One worker process: ``init_worker()`` once, then jobs until the master says it is over."""

    def __init__(
        self,
        address: str,
        keys: Keys,
        handle_job: Callable[[Any], Any],
        *,
        init_worker: Callable[[], Any] | None = None,
        wait_s: float = 60.0,
        threads: int = 1,
        concurrency: int = 1,
        black_box: memoryview | None = None,
        predecessor_died: tuple[int, int, int] | None = None,
        run_over_told: Callable[[], bool] | None = None,
        leaving: Callable[[], None] | None = None,
        init_failed_before: bool = False,
    ) -> None:
        self.address = address
        # Whether this worker's supervisor said the run is over (another worker heard END).
        self.run_over_told = run_over_told
        # Called as the worker starts to leave: its supervisor's stop signals are moot then.
        self.leaving = leaving
        self.black_box = black_box
        self.predecessor_died = predecessor_died
        self.keys = keys
        self.handle_job = handle_job
        self.init_worker = init_worker
        # This process replaces one whose init_worker() failed: say so in one line.
        self.init_failed_before = init_failed_before
        self.wait_s = wait_s
        self.executor = make_executor(handle_job, threads=threads, concurrency=concurrency)

    def run(self) -> int:
        """Block until the run ends; return the process exit status.

        ``init_worker()`` runs first, before any connection, except in a worker that
        replaces one that died running a job: that one says which job in its HELLO before
        init_worker runs (asking for no jobs until it returns), since a slow init_worker
        would bring the news after the master gave up waiting and sent the job out again,
        uncharged.
        """
        replacing = self.predecessor_died is not None
        init_now = None if replacing else self.init_worker
        init_after_hello = self.init_worker if replacing else None
        if init_now is not None and not self._init(init_now):
            return EXIT_INIT_FAILED
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)

        def wake() -> None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(wake_w, b"x")

        queue = JobQueue()
        results = Results(wake, self.black_box)
        identity = os.urandom(8)
        results.black_box[2] = int.from_bytes(identity, "big", signed=True)
        transport = WorkerTransport(self.address, self.keys, identity)
        transport.register(wake_r)
        session = Session(
            transport,
            queue,
            results,
            wake_r,
            slots=executor_slots(self.executor),
            wait_s=self.wait_s,
        )
        session.predecessor_died = self.predecessor_died
        session.ready = init_after_hello is None
        session.start()
        init_failed = False
        try:
            if init_after_hello is not None:
                if not self._init(init_after_hello):
                    init_failed = True
                    # The last words must still reach the master: a connection closed
                    # mid-handshake loses them (and looks like a stranger's to the master).
                    session.welcome_heard.wait(WELCOME_WAIT_S)
                    return EXIT_OK if session.exit_status == EXIT_OK else EXIT_INIT_FAILED
                session.ready = True
                wake()  # the I/O thread grants credit now
            self.executor.run(queue, results)
        finally:
            if self.leaving is not None:
                self.leaving()
            queue.close()
            session.stop_requested = True
            wake()
            session.join(timeout=5)
            # After END (heard here, or by another worker of this supervisor) the master has
            # every result: it ends a run only then, and it is closing its socket. A BYE or
            # a heartbeat queued now would keep this process trying to deliver it for the
            # whole linger (tm-run waited a second for its workers, then stopped them).
            run_over = session.exit_status == EXIT_OK or bool(
                self.run_over_told and self.run_over_told()
            )
            with contextlib.suppress(Exception):
                if session.exit_status is None and not run_over:
                    reason = "init_worker() failed" if init_failed else "interrupted"
                    transport.send(protocol.bye(reason))
                # Nor does anything queued matter to a master that never welcomed us (say,
                # one that failed to open its state file): leave at once rather than linger.
                transport.close(linger_s=2.0 if session.welcomed and not run_over else 0.0)
            os.close(wake_r)
            os.close(wake_w)
        status = session.exit_status if session.exit_status is not None else EXIT_OK
        if status != EXIT_OK:
            raise WorkerGaveUp(session.exit_message or "the worker stopped")
        return status

    def _init(self, init_worker: Callable[[], Any]) -> bool:
        """Run ``init_worker()``; say in the log why it failed (its traceback only once)."""
        try:
            init_worker()
        except Exception as exc:
            if self.init_failed_before:  # its traceback is in the log already
                logger.error("init_worker() failed again: %s: %s", type(exc).__name__, exc)
            else:
                logger.exception("init_worker() failed")
            return False
        return True
