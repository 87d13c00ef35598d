"""The master: one event loop that hands jobs to workers and knows exactly what is done.

``Master.run()`` loops over ``step(now)``: receive → dispatch → expire → checkpoint → report.
Jobs come from the :class:`~taskmaster.feeder.Feeder` thread's bounded buffer and leave in
batches against credit that workers grant; a job is done only when a worker acknowledges it
(late ack), and the ledger's watermark only moves over resolved ids. Frames go through a
transport object (``poll``/``receive``/``send``/``wake``), so tests can drive ``step`` with a
fake transport and a fake clock.
"""

from __future__ import annotations

import collections
import heapq
import logging
import pickle
import random
import signal
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from . import protocol
from .feeder import OVERSHOOT_MIN, Chunk, Feeder, safe_repr
from .leases import Lease, WorkerState, chunk_of, ids_within, merged, runs
from .options import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, MasterConfig
from .progress import NullReporter, Reporter, Snapshot, StalledJob, Summary, WorkerRow
from .state import Checkpoint, FreshLedger, now_iso

if TYPE_CHECKING:
    from .ledger import Ledger

logger = logging.getLogger(__name__)

# Credit one JOBS message uses at most (it may carry up to twice that: see Feeder.take).
MAX_BATCH = 8192
# The most jobs one lease (one JOBS message) holds, so the most one report can name.
MAX_LEASE_JOBS = 2 * MAX_BATCH
REPORT_INTERVAL_S = 0.25
STALL_MIN_S = 3.0
STALL_FACTOR = 10.0
# A group of suspect jobs this small is split into single jobs rather than halves.
SUSPECT_SINGLES = 8
# Failures logged as warnings before the rest go to the info level (all are in the state).
LOGGED_FAILURES = 20
# After a connection closes, a worker that does not answer a probe within this is lost.
PROBE_WINDOW_S = 1.0


class Transport(Protocol):
    def poll(self, timeout_s: float) -> None: ...
    def receive(self) -> Iterable[tuple[bytes, bytes]]: ...
    def send(self, identity: bytes, frame: bytes) -> bool: ...
    def wake(self) -> None: ...


class Master:
    """Serve workers until every job ``feeder`` yields is resolved.

    ``ledger`` holds what is done; ``first_job_check`` is called with the first payload the
    feeder produces on a resume (to detect a ``get_jobs`` that ignores ``last``).
    """

    def __init__(
        self,
        transport: Transport,
        feeder: Feeder,
        ledger: Ledger | FreshLedger,
        config: MasterConfig,
        *,
        reporter: Reporter | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_attempts: dict[int, int] | None = None,
        failures_hint: str = "tm failures",
    ) -> None:
        self.transport = transport
        self.feeder = feeder
        self.ledger = ledger
        self.completed = ledger.completed
        self.config = config
        self.reporter = reporter or NullReporter()
        self.clock = clock
        self.failures_hint = failures_hint
        self.epoch = random.getrandbits(31)
        self._seq = random.getrandbits(40)
        self.workers: dict[bytes, WorkerState] = {}
        self.leases: dict[int, Lease] = {}
        self.requeue: collections.deque[Chunk] = collections.deque()
        # Jobs that were out on a worker that died: one of them may have killed it. Each group
        # goes alone to an idle worker; a group that dies again is halved, and a single job
        # that dies again is blamed (an attempt), so a poison job is found in a few deaths.
        self.suspects: collections.deque[Chunk] = collections.deque()
        self.delayed: list[tuple[float, int, bytes]] = []
        self.attempts: dict[int, int] = {}
        self._failures_logged = 0
        self._charged: dict[bytes, int] = {}  # dead worker → the job its death was charged to
        # --retry-failed: ids whose earlier failure is being retried, with its attempt count.
        self.retrying: dict[int, int] | None = retry_attempts
        base = ledger.checkpoint_row
        self.state = Checkpoint(
            resume_id=base.resume_id,
            resume_job=base.resume_job,
            first_job=base.first_job,
            done=base.done,
            failed=base.failed,
            duplicates=base.duplicates,
            retried=base.retried,
            total=config.total if config.total is not None else base.total,
            started=base.started or now_iso(),
        )
        self.done_at_start = base.done
        # tm-run: says why the run cannot go on (its workers are all gone), else None.
        self.watchdog: Callable[[], str | None] | None = None
        self.display_total: int | None = None  # --retry-failed shows the failures to retry
        self.in_flight = 0
        self.dropped_frames = 0
        self.stopping = False
        self.stop_deadline: float | None = None
        self.force_stop = False
        self.finished = False
        self.exit_status = EXIT_OK
        self.started_at = clock()
        self.first_dispatch_s: float | None = None
        self._next_ping = 0.0
        self._disconnects_seen = 0
        self._probe_sent = 0.0
        self._probe_deadline = 0.0
        self._probe_again = False
        self._next_checkpoint = self.started_at + config.checkpoint_interval_s
        self._next_report = 0.0
        self._prepare_state_by = self.started_at + REPORT_INTERVAL_S
        self._rate_samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=40)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until done or stopped; return the exit status."""
        self.reporter.start()
        self.feeder.start()
        try:
            while not self.finished:
                self.transport.poll(self._poll_timeout())
                self.step(self.clock())
        finally:
            self.feeder.stop()
        return self.exit_status

    def _poll_timeout(self) -> float:
        if self.feeder.waiting and self.feeder.buffered:
            return 0.0
        timeout = min(self._next_ping, self._next_checkpoint) - self.clock()
        if self._probe_deadline:
            timeout = min(timeout, self._probe_deadline - self.clock())
        if self.delayed:
            timeout = min(timeout, self.delayed[0][0] - self.clock())
        return min(max(timeout, 0.0), REPORT_INTERVAL_S)

    def step(self, now: float) -> None:
        """One iteration: take what arrived, hand out jobs, expire, checkpoint, report."""
        for identity, frame in self.transport.receive():
            self.handle_frame(identity, frame, now)
        self._take_bad_jobs(now)
        if not self.stopping:
            self.dispatch(now)
        if self._state_due(now):
            self.ledger.prepare()
        disconnects = getattr(self.transport, "disconnects", 0)
        if disconnects != self._disconnects_seen:
            self._disconnects_seen = disconnects
            self._probe(now)
        if now >= self._next_ping or (self._probe_deadline and now >= self._probe_deadline):
            self._ping(now)
            self.expire(now)
            if self.watchdog is not None and not self.finished:
                reason = self.watchdog()
                if reason:
                    logger.error("%s: stopping; run the same command again to resume", reason)
                    self._finish(now, EXIT_FAILED, pause=True)
                    return
        if now >= self._next_checkpoint:
            self.checkpoint(now)
        if now >= self._next_report:
            self._report(now)
        self._check_finished(now)

    def _state_due(self, now: float) -> bool:
        """Whether to start a fresh state's tables (``ledger.prepare``) now.

        They load SQLite on a thread, which holds the GIL: once jobs are out rather than
        during the handshakes, and with tm-run once each of its workers has joined (a HELLO
        waiting for the GIL held its worker's first jobs back by 5 ms). At the latest by the
        first report: say, a tm-master no worker has reached yet, which `tm status` must read.
        """
        if now >= self._prepare_state_by:
            return True
        if self.first_dispatch_s is None:
            return False
        expected = self.config.expected_workers
        return expected is None or len(self.workers) >= expected

    # -- messages ------------------------------------------------------------------------

    def handle_frame(self, identity: bytes, frame: bytes, now: float) -> None:
        try:
            message = protocol.decode_from_worker(frame)
        except Exception as exc:  # ProtocolError, and anything a hostile frame may provoke
            self.dropped_frames += 1
            if self.dropped_frames <= 10 or self.dropped_frames % 1000 == 0:
                logger.warning(
                    "dropped frame from=%s: %s (%d so far)",
                    identity.hex()[:8],
                    exc,
                    self.dropped_frames,
                )
            return
        worker = self.workers.get(identity)
        if isinstance(message, protocol.Ack):
            self.handle_ack(worker, message, now)
            if worker is None:
                self.transport.send(identity, protocol.REHELLO_FRAME)
            elif worker.unreachable:
                self._heard_while_unreachable(worker, now)
        elif isinstance(message, protocol.Heartbeat):
            if worker is None:
                self.transport.send(identity, protocol.REHELLO_FRAME)
                return
            worker.last_seen = now
            worker.running_job = message.running_job
            worker.running_s = message.running_s
            worker.running_seen = now
            if worker.unreachable:
                self._heard_while_unreachable(worker, now)
        elif isinstance(message, protocol.Hello):
            self.handle_hello(identity, message, now)
        elif isinstance(message, protocol.Bye) and worker is not None:
            logger.info("worker left worker=%s reason=%s", worker.name, message.reason)
            self._drop_worker(worker, now, lost=False)
        elif isinstance(message, protocol.GiveBack) and worker is not None:
            self.handle_give_back(worker, message)

    def handle_hello(self, identity: bytes, hello: protocol.Hello, now: float) -> None:
        if hello.version != protocol.PROTOCOL_VERSION:
            logger.warning(
                "refused worker %s:%d: protocol %d, ours %d",
                hello.host,
                hello.pid,
                hello.version,
                protocol.PROTOCOL_VERSION,
            )
            self.transport.send(
                identity,
                protocol.refuse(
                    f"protocol version {hello.version} is not {protocol.PROTOCOL_VERSION}: "
                    "run the same taskmaster version on master and workers"
                ),
            )
            return
        old = self.workers.get(identity)
        if old is not None:
            # The worker restarted its session (it lost us for a while): its old leases are void.
            self._drop_worker(old, now, lost=False)
        if hello.died is not None:
            self._last_words(*hello.died, now=now)
        worker = WorkerState(identity, hello.host, hello.pid, hello.slots, hello.credit, now)
        worker.rate_mark = (now, 0)
        self.workers[identity] = worker
        logger.info("worker joined worker=%s slots=%d", worker.name, worker.slots)
        config = {
            "heartbeat_s": self.config.heartbeat_s,
            "liveness_s": self.config.liveness_s,
            "timeout_s": self.config.timeout_s,
            "run": getattr(self.ledger, "run_id", ""),
        }
        self.transport.send(identity, protocol.welcome(self.epoch, config))
        if self.stopping:
            self.transport.send(identity, protocol.PAUSE_FRAME)

    def handle_ack(self, worker: WorkerState | None, ack: protocol.Ack, now: float) -> None:
        leases = self.leases
        newly_total = 0
        acked_total = 0
        # Entries are grouped by lease, each lease walked once a message (however many
        # entries name it), and cut to its jobs; see Lease.within.
        ranges: dict[int, list[tuple[int, int]]] = {}
        late: list[tuple[int, int]] = []
        for seq, first_id, count in ack.acks:
            if seq in leases:
                ranges.setdefault(seq, []).append((first_id, first_id + count))
            else:
                # Settled or requeued meanwhile (say, the worker was presumed lost and came
                # back, or the master restarted): the jobs it ran still count, once. No
                # lease holds more than MAX_LEASE_JOBS, so no report names more.
                late.append((first_id, first_id + min(count, MAX_LEASE_JOBS)))
        for seq, named in ranges.items():
            held = leases[seq]
            ids = held.within(named)
            spans = [(ids.start, len(ids))] if isinstance(ids, range) else list(runs(ids))
            acked_total += len(ids)
            newly_total += self._resolve(spans)
            if worker is not None and held.worker == worker.identity and ids:
                # Count what the lease had not heard of yet: a repeated report must not
                # release the lease's other jobs.
                reported = sum(held.report(start, n) for start, n in spans)
                if reported:
                    self._lease_progress(held, worker, reported)
        if late:
            acked, newly = self._resolve_late(late)
            acked_total += acked
            newly_total += newly
        for seq, job_id, error, message, traceback in ack.failures:
            lease = self._lease_holding(worker, seq, job_id)
            self._handle_failure(worker, lease, job_id, error, message, traceback, now)
            if lease is not None and worker is not None and lease.worker == worker.identity:
                self._lease_progress(lease, worker, lease.report(job_id, 1))
        self.state.done += newly_total
        self.state.duplicates += acked_total - newly_total
        if worker is not None:
            worker.done += acked_total
            worker.last_seen = now
            worker.credit += ack.credit
            if ack.end_window:
                worker.end_window = ack.end_window

    def handle_give_back(self, worker: WorkerState, message: protocol.GiveBack) -> None:
        """Requeue the jobs a worker returns unstarted (long jobs hold its slots, and the
        free ones would not get through them soon) ahead of new ones, for the other workers.

        The worker's unused credit goes too (it voids the same on its side): anything more
        would queue behind the same long jobs. It grants credit again, for its free slots,
        once one of its jobs ends.
        """
        worker.credit -= message.voided  # below 0 by the jobs on their way: see the worker
        by_seq: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        for seq, first_id, count in message.returned:
            by_seq[seq].append((first_id, first_id + count))
        returned = requeued = 0
        chunks: list[tuple[Chunk, bool]] = []
        for seq, ranges in by_seq.items():
            lease = self.leases.get(seq)
            if lease is None or lease.worker != worker.identity:
                continue  # settled meanwhile, or requeued when the worker was presumed lost
            chunk = lease.chunk
            # One pass over the lease, whatever the message claims: its work is bounded by
            # what the worker holds, not by the frame.
            wanted = set(lease.within(ranges))
            if not wanted:
                continue
            newly = 0
            back: list[tuple[int, bytes]] = []
            for job_id, payload in zip(chunk.id_list(), chunk.pickles(), strict=True):
                if job_id in wanted and lease.report(job_id, 1):  # not answered for before
                    newly += 1
                    if not self._is_resolved(job_id):
                        back.append((job_id, payload))
            returned += newly
            self._lease_progress(lease, worker, newly)
            if back:
                requeued += len(back)
                # A suspect group stays one: it may hold the job that killed a worker.
                chunks.append((chunk_of(sorted(back), consecutive=True), lease.suspect))
        # Lowest ids first, ahead of what was waiting: the resume point moves on soonest.
        for chunk, suspect in sorted(chunks, key=lambda c: c[0].lowest()[0], reverse=True):
            (self.suspects if suspect else self.requeue).appendleft(chunk)
        logger.info(
            "worker=%s gave back %d jobs queued behind long ones (requeued %d)",
            worker.name,
            returned,
            requeued,
        )

    def _lease_progress(self, lease: Lease, worker: WorkerState, count: int) -> None:
        """``count`` more jobs of ``lease`` were reported; forget the lease when none is left."""
        count = min(count, lease.remaining)
        lease.remaining -= count
        self.in_flight -= count
        if lease.remaining <= 0:
            del self.leases[lease.seq]
            worker.leases.discard(lease.seq)

    def _sweep_leases(self) -> None:
        """Forget leases whose jobs were all resolved by others (a worker presumed lost
        reported them first), so a run never waits on a lease nobody will settle."""
        for lease in list(self.leases.values()):
            chunk = lease.chunk
            if chunk.ids is None and self.retrying is None:
                settled = self.completed.covers(chunk.first_id, len(chunk))
            else:
                settled = all(self._is_resolved(i) for i in chunk.id_list())
            if settled:
                self.in_flight -= lease.remaining
                lease.remaining = 0
                del self.leases[lease.seq]
                worker = self.workers.get(lease.worker)
                if worker is not None:
                    worker.leases.discard(lease.seq)

    def _lease_holding(self, worker: WorkerState | None, seq: int, job_id: int) -> Lease | None:
        """The lease of ``worker`` that holds ``job_id`` (``seq`` is the worker's guess)."""
        lease = self.leases.get(seq)
        if lease is not None and lease.payload_of(job_id) is not None:
            return lease
        if worker is None:
            return None
        for other in worker.leases:
            lease = self.leases.get(other)
            if lease is not None and lease.payload_of(job_id) is not None:
                return lease
        return None

    def _resolve(self, spans: Iterable[tuple[int, int]]) -> int:
        """Count the jobs of ``spans`` ((first id, count) each) resolved; return how many were
        new. A --retry-failed run resolves only the jobs it retries."""
        if self.retrying is None:
            return sum(self.completed.add(start, n) for start, n in spans)
        return self._resolve_retried(i for start, n in spans for i in range(start, start + n))

    def _resolve_retried(self, ids: Iterable[int]) -> int:
        assert self.retrying is not None
        newly = 0
        for job_id in ids:
            if self.retrying.pop(job_id, None) is not None:
                self.ledger.clear_failure(job_id)
                self.state.failed -= 1
                newly += 1
        return newly

    def _resolve_late(self, late: list[tuple[int, int]]) -> tuple[int, int]:
        """Reports for leases no longer held: (jobs reported, jobs newly resolved)."""
        spans = merged(late)
        reported = sum(end - start for start, end in spans)
        if self.retrying is not None and reported > len(self.retrying):
            # Walk the smaller of the two: the retried jobs, not a million reported ids.
            return reported, self._resolve_retried(ids_within(sorted(self.retrying), spans))
        return reported, self._resolve((start, end - start) for start, end in spans)

    # -- failures ------------------------------------------------------------------------

    def _handle_failure(
        self,
        worker: WorkerState | None,
        lease: Lease | None,
        job_id: int,
        error: str,
        message: str,
        traceback: str,
        now: float,
    ) -> None:
        payload = lease.payload_of(job_id) if lease is not None else None
        if payload is None:
            # A report about a lease this master never made (an earlier master's): the job is
            # not done in the ledger, so it runs again here. Nothing is lost.
            return
        attempts = self.attempts.get(job_id, 0) + 1
        if attempts <= self.config.retries and error != "Timeout":
            self.attempts[job_id] = attempts
            self.state.retried += 1
            delay = min(
                self.config.retry_backoff_s * 2 ** (attempts - 1), self.config.retry_backoff_max_s
            )
            delay *= random.uniform(0.5, 1.5)
            heapq.heappush(self.delayed, (now + delay, job_id, payload))
            logger.info(
                "retry job=%d attempt=%d in %.1fs after %s: %s",
                job_id,
                attempts + 1,
                delay,
                error,
                message,
            )
            return
        self._record_failure(
            job_id, payload, attempts, error, message, traceback, worker.name if worker else "?"
        )

    def _record_failure(
        self,
        job_id: int,
        payload: bytes | None,
        attempts: int,
        error: str,
        message: str,
        traceback: str,
        worker: str,
    ) -> None:
        self.attempts.pop(job_id, None)
        if self.retrying is not None:
            previous = self.retrying.pop(job_id, None)
            if previous is None:
                return
            attempts += previous
        elif self.completed.add(job_id, 1) == 0:
            return  # already done elsewhere (a duplicate delivery): the success stands
        else:
            self.state.failed += 1
        self._failures_logged += 1
        # Every failure is in the state file; the log shows the first ones, not thousands.
        if self._failures_logged <= LOGGED_FAILURES:
            logger.warning("failed job=%d attempts=%d %s: %s", job_id, attempts, error, message)
            if self._failures_logged == LOGGED_FAILURES:
                logger.warning("more failures are logged at info level; all are in tm failures")
        else:
            logger.info("failed job=%d attempts=%d %s: %s", job_id, attempts, error, message)
        self.ledger.record_failure(
            job_id, payload, self._describe(payload), attempts, error, message, traceback, worker
        )

    @staticmethod
    def _describe(payload: bytes | None) -> str:
        # The master unpickles only what its own feeder pickled, never worker data.
        if payload is None:
            return "?"
        try:
            return safe_repr(pickle.loads(payload))
        except Exception:
            return f"<{len(payload)} bytes>"

    def _take_bad_jobs(self, now: float) -> None:
        for bad in self.feeder.drain_bad():
            if self.completed.add(bad.job_id, 1):
                self.state.failed += 1
                self.ledger.record_failure(
                    bad.job_id, None, bad.job_repr, 1, bad.error, bad.message, "", "master"
                )

    # -- dispatch ------------------------------------------------------------------------

    def dispatch(self, now: float) -> None:
        feeder = self.feeder
        starved = False
        workers = self.workers
        # Once get_jobs is exhausted, what is left is shared out by slots rather than first
        # come, first served: otherwise the worker that acks first queues the last jobs of
        # the run while another one idles. What is left does not change while jobs are
        # handed out (they only move from waiting to out), so it is counted once here.
        end = self._end_of_run()
        for worker in list(workers.values()):
            share = self._share(worker, *end) if end is not None else None
            while worker.credit > 0 and not worker.unreachable and worker.identity in workers:
                chunk, suspect = self._next_chunk(worker, now, share)
                if chunk is None:
                    # The buffer is empty (the feeder wakes us when it is not), the next
                    # chunk waits for this busy worker's next ack rather than be split, or
                    # the worker holds its share of the end.
                    starved = starved or not worker.leases or not feeder.buffered
                    break
                if not self._send_chunk(worker, chunk, now, suspect):
                    end = self._end_of_run()  # the rest share the end without it
                    break
                if share is not None:
                    share -= len(chunk)
                if suspect:
                    break  # a suspect travels alone, or a death could not be blamed on it
        feeder.waiting = starved

    def _next_chunk(
        self, worker: WorkerState, now: float, share: int | None = None
    ) -> tuple[Chunk | None, bool]:
        n = min(worker.credit, MAX_BATCH)
        while self.delayed and self.delayed[0][0] <= now:
            _, job_id, payload = heapq.heappop(self.delayed)
            self.requeue.append(Chunk(job_id, [payload], [job_id]))
        # A job that may have killed its worker goes alone to an idle worker, so a second
        # death blames exactly that job.
        if self.suspects and not worker.leases:
            return self.suspects.popleft(), True
        if share is not None:
            n = min(n, share)
            if n <= 0:
                return None, False  # it holds its share: the others' acks free more
        if self.requeue:
            head = self.requeue[0]
            if len(head) <= n:
                return self.requeue.popleft(), False
            return head.split(n), False
        if share is not None:
            # Exact fills at the end, or a chunk taken whole could give one worker twice
            # its share.
            chunks = self.feeder.take(n, exact=True)
        else:
            # A busy worker with a big window (fast jobs) acks again soon: its leftover
            # credit can wait for a whole chunk that fits its window. Small windows are
            # filled at once.
            window = 0
            if worker.leases and n >= OVERSHOOT_MIN:
                window = worker.credit + self._held(worker)
            chunks = self.feeder.take(n, wait_up_to=window)
        if not chunks:
            return None, False
        for extra in chunks[1:]:
            self.requeue.append(extra)
        return chunks[0], False

    def _end_of_run(self) -> tuple[int, int] | None:
        """Once get_jobs is exhausted and several workers share the end: all their slots
        and all the jobs left (buffered, waiting to be sent again, or out); else None."""
        if not self.feeder.exhausted:
            return None
        reachable = [w for w in self.workers.values() if not w.unreachable]
        if len(reachable) < 2:
            return None
        waiting = sum(len(c) for c in self.requeue) + sum(len(c) for c in self.suspects)
        left = self.feeder.buffered + self.in_flight + waiting + len(self.delayed)
        return sum(w.slots for w in reachable), left

    def _share(self, worker: WorkerState, total_slots: int, left: int) -> int:
        """How many more jobs ``worker`` may take once get_jobs is exhausted.

        At most its slots' share of all that is left. And once that share is less than twice
        what it asks for (its window: long, so that messages are few), it holds half the share,
        but never less than its end window (a round trip's work): the master keeps the rest for
        whichever worker runs dry first. Otherwise jobs queued at a slower worker decide the
        end of the run while a faster one idles (48 ms on a run of 400 × 5 ms jobs, against
        about 10 this way).
        """
        held = self._held(worker)
        share = -(-left * worker.slots // total_slots)
        window = worker.credit + held
        return min(share, max(worker.end_window, min(window, share // 2))) - held

    def _held(self, worker: WorkerState) -> int:
        leases = self.leases
        return sum(lease.remaining for seq in worker.leases if (lease := leases.get(seq)))

    def _send_chunk(self, worker: WorkerState, chunk: Chunk, now: float, suspect: bool) -> bool:
        """Lease ``chunk`` to ``worker``; False if its connection is gone (see below)."""
        assert len(chunk) <= MAX_LEASE_JOBS, "a report could not name all of this lease"
        self._seq += 1
        seq = self._seq
        ids: int | list[int] = chunk.ids if chunk.ids is not None else chunk.first_id
        if not self.transport.send(worker.identity, protocol.jobs(seq, ids, *chunk.wire())):
            # Its connection is gone: it crashed (its successor's last words may be on their
            # way, naming the job that killed it) or the network dropped it. Its leases stay
            # until one of those is known, or a probe finds it lost, so that a job that
            # killed it is not sent at once to the next worker as if innocent.
            (self.suspects if suspect else self.requeue).appendleft(chunk)
            worker.unreachable = True
            self._probe(now)
            return False
        n = len(chunk)
        if self.first_dispatch_s is None:
            self.first_dispatch_s = now - self.started_at
            logger.info(
                "first dispatch after %.3fs job=%d", self.first_dispatch_s, chunk.lowest()[0]
            )
        worker.credit -= n
        worker.leases.add(seq)
        self.leases[seq] = Lease(seq, worker.identity, chunk, now, n, suspect)
        self.in_flight += n
        return True

    # -- liveness ------------------------------------------------------------------------

    def _ping(self, now: float) -> None:
        self._next_ping = now + self.config.heartbeat_s
        frame = protocol.ping(self.epoch)
        for identity in list(self.workers):
            self.transport.send(identity, frame)

    def _heard_while_unreachable(self, worker: WorkerState, now: float) -> None:
        """A message from a worker a send to which failed: its connection came back (JOBS
        sent on the old one may be lost, so it starts a fresh session, whose HELLO requeues
        what it held), or it was a dead worker's last word (probe again)."""
        if not self.transport.send(worker.identity, protocol.REHELLO_FRAME):
            self._probe(now)

    def _probe(self, now: float) -> None:
        """A connection closed: ask every worker to answer now, and drop the ones that don't."""
        if self._probe_deadline:
            self._probe_again = True  # one probe at a time: a flood costs one more round
            return
        self._probe_sent = now
        self._probe_deadline = now + PROBE_WINDOW_S
        for identity in list(self.workers):
            self.transport.send(identity, protocol.PROBE_FRAME)

    def expire(self, now: float) -> None:
        """Drop workers silent for longer than the liveness window; requeue their jobs."""
        probed = bool(self._probe_deadline) and now >= self._probe_deadline
        probe_sent = self._probe_sent
        for worker in list(self.workers.values()):
            if probed and worker.last_seen <= probe_sent:  # heard before the probe: no answer
                logger.warning("lost worker=%s: no answer to a probe", worker.name)
                self._drop_worker(worker, now, lost=True)
            elif now - worker.last_seen > self.config.liveness_s:
                logger.warning(
                    "lost worker=%s silent for %.1fs", worker.name, now - worker.last_seen
                )
                self._drop_worker(worker, now, lost=True)
        if probed:
            self._probe_deadline = 0.0
            if self._probe_again:
                self._probe_again = False
                self._probe(now)

    def _last_words(self, identity: bytes, job_id: int, seq: int, *, now: float) -> None:
        """A new worker says its predecessor died running ``job_id``: drop the dead one now
        (if we still think it alive) and charge exactly that job an attempt."""
        dead = self.workers.get(identity)
        if dead is not None:
            logger.warning("lost worker=%s: it died running job=%d", dead.name, job_id)
            self._drop_worker(dead, now, lost=True, culprit=job_id)
        elif self._charged.get(identity, -1) != job_id and not self._is_resolved(job_id):
            self._blame(job_id, None, "?")
        self._charged.pop(identity, None)

    def _remember_charge(self, identity: bytes, job_id: int) -> None:
        """Note that a dead worker's death was charged to ``job_id`` already, so its
        successor's last words do not charge it twice."""
        self._charged[identity] = job_id
        while len(self._charged) > 1024:
            self._charged.pop(next(iter(self._charged)))

    def _blame(self, job_id: int, payload: bytes | None, worker: str) -> None:
        """Charge ``job_id`` one death of its worker: once that makes ``--max-attempts`` it
        is failed (``WorkerLost``); else it waits as a suspect. ``payload`` None: the death
        was learnt late and the job already waits somewhere (or is out on a worker again)."""
        attempts = self.attempts.get(job_id, 0) + 1
        self.attempts[job_id] = attempts
        if attempts < self.config.max_attempts:
            if payload is not None:
                self.suspects.append(chunk_of([(job_id, payload)]))
            return
        if payload is None:
            payload = self._take_back(job_id)
            if payload is None:
                return  # out on a worker again: its next death fails it
        message = f"its worker died each of the {attempts} times it ran"
        self._record_failure(job_id, payload, attempts, "WorkerLost", message, "", worker)

    def _take_back(self, job_id: int) -> bytes | None:
        """Remove a waiting job from the suspect and requeue lines; return its payload."""
        for line in (self.suspects, self.requeue):
            for chunk in line:
                ids = chunk.id_list()
                if job_id in ids:
                    payloads = chunk.pickles()
                    i = ids.index(job_id)
                    payload = payloads.pop(i)
                    if chunk.ids is None:
                        chunk.ids = ids
                    chunk.ids.pop(i)
                    chunk.count -= 1
                    if not chunk.ids:
                        line.remove(chunk)
                    else:
                        chunk.first_id = chunk.ids[0]
                    return payload
        return None

    def _drop_worker(
        self, worker: WorkerState, now: float, *, lost: bool, culprit: int | None = None
    ) -> None:
        self.workers.pop(worker.identity, None)
        requeued = 0
        timed_out = self._timed_out_job(worker, now) if lost else None
        for seq in sorted(worker.leases):
            lease = self.leases.pop(seq, None)
            if lease is None:
                continue
            self.in_flight -= lease.remaining
            requeued += self._requeue_lease(lease, worker, lost, timed_out, culprit)
        worker.leases.clear()
        if requeued:
            logger.info("lost worker=%s requeued=%d", worker.name, requeued)

    def _timed_out_job(self, worker: WorkerState, now: float) -> int | None:
        timeout = self.config.timeout_s
        if timeout is None or worker.running_job < 0:
            return None
        running = worker.running_s + (now - worker.running_seen)
        return worker.running_job if running > timeout else None

    def _requeue_lease(
        self,
        lease: Lease,
        worker: WorkerState,
        lost: bool,
        timed_out: int | None,
        culprit: int | None = None,
    ) -> int:
        chunk = lease.chunk
        answered = lease.reported  # done, failed or given back: not this lease's to requeue
        pending = [
            (i, p)
            for i, p in zip(chunk.id_list(), chunk.pickles(), strict=True)
            if not self._is_resolved(i) and (answered is None or i not in answered)
        ]
        if timed_out is not None:
            for job_id, payload in pending:
                if job_id == timed_out:
                    message = f"no answer within --timeout {self.config.timeout_s:g}s"
                    attempts = self.attempts.get(job_id, 0) + 1
                    self._record_failure(
                        job_id, payload, attempts, "Timeout", message, "", worker.name
                    )
            pending = [(i, p) for i, p in pending if i != timed_out]
        if not pending:
            return 0
        if culprit is not None:
            # We know which job killed the worker: charge it; the others are innocent.
            guilty = [(i, p) for i, p in pending if i == culprit]
            innocent = [(i, p) for i, p in pending if i != culprit]
            for job_id, payload in guilty:
                self._blame(job_id, payload, worker.name)
            if innocent:
                self.requeue.appendleft(chunk_of(innocent))
        elif not lost:
            self.requeue.appendleft(chunk_of(pending))
        elif len(pending) == 1 and lease.suspect and self._alive_at(worker, lease.sent_at):
            job_id, payload = pending[0]
            self._remember_charge(worker.identity, job_id)
            self._blame(job_id, payload, worker.name)
        elif len(pending) <= SUSPECT_SINGLES or lease.suspect and len(pending) <= 2:
            self.suspects.extend(chunk_of([job]) for job in pending)
        elif lease.suspect:
            half = len(pending) // 2
            self.suspects.extend((chunk_of(pending[:half]), chunk_of(pending[half:])))
        else:
            self.suspects.append(chunk_of(pending))
        return len(pending)

    def _alive_at(self, worker: WorkerState, when: float) -> bool:
        """Whether ``worker`` was heard from shortly before ``when`` (so a job sent then ran)."""
        return worker.last_seen >= when - 1.5 * self.config.heartbeat_s

    def _is_resolved(self, job_id: int) -> bool:
        if self.retrying is not None:
            return job_id not in self.retrying
        return job_id in self.completed

    # -- checkpoint, report, finish ------------------------------------------------------

    def resume_point(self) -> tuple[int, bytes] | None:
        """The lowest unresolved job we hold (id, payload): what ``last`` must be on resume."""
        best: tuple[int, bytes] | None = None
        candidates: list[tuple[int, bytes]] = []
        candidates.extend(lease.chunk.lowest() for lease in self.leases.values())
        candidates.extend(chunk.lowest() for chunk in self.requeue)
        candidates.extend(chunk.lowest() for chunk in self.suspects)
        candidates.extend((job_id, payload) for _, job_id, payload in self.delayed)
        head = self.feeder.peek_first()
        if head is not None:
            candidates.append(head)
        for candidate in candidates:
            if best is None or candidate[0] < best[0]:
                best = candidate
        return best

    def checkpoint(self, now: float) -> None:
        self._next_checkpoint = now + self.config.checkpoint_interval_s
        self._sweep_leases()
        state = self.state
        if self.retrying is None:
            point = self.resume_point()
            if point is not None and point[0] >= state.resume_id:
                state.resume_id, state.resume_job = point
            if state.first_job is None and self.feeder.first_payload is not None:
                state.first_job = self.feeder.first_payload
            # (A --retry-failed run's feeder holds only the failures: whether get_jobs ran
            # to its end is the run's own business, kept as it was.)
            feeder_done = self.feeder.done and not self.feeder.failure
            state.exhausted = feeder_done and not self._outstanding()
            failure = self.feeder.failure
            state.generator_error = f"{failure.error}: {failure.message}" if failure else None
        state.in_flight = self.in_flight
        state.workers = len(self.workers)
        state.rate = self._rate(now)
        self.ledger.checkpoint(state)

    def _outstanding(self) -> bool:
        return bool(self.leases or self.requeue or self.suspects or self.delayed)

    def _rate(self, now: float) -> float:
        samples = self._rate_samples
        # Failed jobs are finished too: counting them keeps the ETA honest when many fail.
        finished = self.state.done + self.state.failed
        samples.append((now, finished))
        while len(samples) > 2 and now - samples[0][0] > 5.0:
            samples.popleft()
        t0, d0 = samples[0]
        return (finished - d0) / (now - t0) if now > t0 else 0.0

    def snapshot(self, now: float) -> Snapshot:
        rate = self._rate(now)
        return Snapshot(
            done=self.state.done,
            done_at_start=self.done_at_start,
            total=self.display_total if self.display_total is not None else self.state.total,
            failed=self.state.failed,
            retried=self.state.retried,
            duplicates=self.state.duplicates,
            buffered=self.feeder.buffered,
            size=self.feeder.size,
            in_flight=self.in_flight,
            workers=len(self.workers),
            elapsed_s=now - self.started_at,
            rate=rate,
            stalled=self._stalled(now, rate),
            worker_rows=self._worker_rows(now),
            phase="replaying"
            if self.feeder.replaying
            else ("stopping" if self.stopping else "running"),
            replayed=self.feeder.stats.replayed,
        )

    def _stalled(self, now: float, rate: float) -> StalledJob | None:
        oldest: WorkerState | None = None
        for worker in self.workers.values():
            if worker.running_job >= 0 and (oldest is None or worker.running_s > oldest.running_s):
                oldest = worker
        if oldest is None:
            return None
        slots = sum(w.slots for w in self.workers.values()) or 1
        typical = slots / rate if rate > 0 else 0.0
        running = oldest.running_s + (now - oldest.running_seen)
        if running < max(STALL_MIN_S, STALL_FACTOR * typical):
            return None
        return StalledJob(oldest.running_job, oldest.name, running)

    def _worker_rows(self, now: float) -> tuple[WorkerRow, ...]:
        rows = []
        for w in self.workers.values():
            t0, d0 = w.rate_mark
            if now - t0 >= 2.0:
                w.rate = (w.done - d0) / (now - t0)
                w.rate_mark = (now, w.done)
            rows.append(
                WorkerRow(w.identity.hex()[:8], w.host, w.pid, w.done, w.rate, now - w.last_seen)
            )
        return tuple(rows)

    def _report(self, now: float) -> None:
        self._next_report = now + REPORT_INTERVAL_S
        self.reporter.update(self.snapshot(now))

    def _check_finished(self, now: float) -> None:
        if self.stopping:
            if (
                self.force_stop
                or not self.leases
                or (self.stop_deadline is not None and now >= self.stop_deadline)
            ):
                self._finish(now, EXIT_INTERRUPTED)
            return
        if self.feeder.done and not self._outstanding():
            # The feeder records bad jobs before it marks itself done: take the last of them.
            self._take_bad_jobs(now)
            status = EXIT_FAILED if (self.state.failed or self.feeder.failure) else EXIT_OK
            self._finish(now, status)

    def _finish(self, now: float, status: int, *, pause: bool = False) -> None:
        self.checkpoint(now)
        pause = pause or status == EXIT_INTERRUPTED
        frame = protocol.PAUSE_FRAME if pause else protocol.END_FRAME
        for identity in list(self.workers):
            self.transport.send(identity, frame)
        self.exit_status = status
        self.finished = True

    def summary(self, now: float | None = None) -> Summary:
        now = self.clock() if now is None else now
        return Summary(
            done=self.state.done,
            failed=self.state.failed,
            duplicates=self.state.duplicates,
            retried=self.state.retried,
            elapsed_s=now - self.started_at,
            done_this_run=self.state.done - self.done_at_start,
            state_path=str(self.ledger.path),
            failures_hint=self.failures_hint,
            interrupted=self.exit_status == EXIT_INTERRUPTED,
        )

    # -- signals -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: stop handing out jobs and drain briefly; second: stop now."""
        if self.stopping:
            self.force_stop = True
        else:
            self.stopping = True
            self.stop_deadline = self.clock() + self.config.grace_s
        self.transport.wake()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.request_stop()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
