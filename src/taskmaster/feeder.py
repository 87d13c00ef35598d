"""Pull jobs from ``get_jobs`` on a thread of its own into a bounded buffer of pickled chunks.

The feeder numbers jobs in generator order (the job id), pickles each one, and hands them to
the master in chunks of consecutive ids. A slow generator only delays the chunks, never the
master's network loop; a fast one never gets more than ``size`` jobs ahead of the workers.
No zmq here.
"""

from __future__ import annotations

import collections
import itertools
import logging
import pickle
import threading
import time
import traceback as tb_module
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
# Up to a JOBS message's worth (master.MAX_BATCH): per-message costs (framing, encryption,
# wake-ups on both sides) were half of a no-op job's cost at 4,096.
MAX_CHUNK = 8192
# A chunk is handed over once it took this long to pull, so a slow generator's jobs still
# reach workers promptly.
CHUNK_FLUSH_S = 0.005
REPLAY_STEP = 100_000
# Credit from which a chunk may overshoot it rather than be split (see Feeder.take). Windows
# this big come with fast jobs (worker.PREFETCH_S of jobs under 200 us a slot), where a
# split's cost matters; slower jobs keep exact fills. The end of a run is always filled
# exactly (Master._share), so the last jobs spread evenly.
OVERSHOOT_MIN = 1024
# Packed chunks stop growing past this size, so big jobs travel in small messages.
CHUNK_BYTES = 1024 * 1024


class Chunk:
    """Consecutive jobs: ids ``first_id …`` (or the explicit ``ids``) and their pickles.

    Jobs straight from the generator are *packed*: each pull pickled as one list (``blobs``,
    with ``blob_counts`` jobs each, and ``head``, the first job's own pickle for the resume
    point), which costs a tenth of pickling each job. Contiguous packed chunks merge by
    listing their blobs. Splitting a packed chunk unpickles it once into ``jobs`` (*loose*):
    the pieces are slices of that list, each pickled as one list when it is sent, so a chunk
    taken in many pieces costs one unpickle rather than a re-pack per piece. A chunk becomes
    per-job pickles only when one job's payload is needed (a retry, a failure record).
    """

    __slots__ = ("first_id", "payloads", "ids", "blobs", "blob_counts", "count", "head", "jobs")

    def __init__(
        self,
        first_id: int,
        payloads: list[bytes] | None,
        ids: list[int] | None = None,
        *,
        blobs: list[bytes] | None = None,
        blob_counts: list[int] | None = None,
        head: bytes | None = None,
        jobs: list[Any] | None = None,
    ) -> None:
        self.first_id = first_id
        self.payloads = payloads
        self.ids = ids
        self.blobs = blobs
        self.blob_counts = blob_counts
        self.head = head
        self.jobs = jobs
        if payloads is not None:
            self.count = len(payloads)
        elif blob_counts is not None:
            self.count = sum(blob_counts)
        else:
            self.count = len(jobs) if jobs is not None else 0

    def __len__(self) -> int:
        return self.count

    @property
    def packed(self) -> bool:
        return self.blobs is not None or self.jobs is not None

    def _pack(self) -> None:
        """Loose → packed: the jobs pickled as one list."""
        if self.jobs is not None:
            self.blobs = [pickle.dumps(self.jobs, PICKLE_PROTOCOL)]
            self.blob_counts = [len(self.jobs)]
            self.jobs = None

    def pickles(self) -> list[bytes]:
        """The per-job pickles (unpacking a packed chunk once; the master pickled it)."""
        if self.payloads is None:
            if self.jobs is None:
                assert self.blobs is not None
                self.jobs = [job for blob in self.blobs for job in pickle.loads(blob)]
            self.payloads = [pickle.dumps(job, PICKLE_PROTOCOL) for job in self.jobs]
            self.blobs = self.blob_counts = self.jobs = None
        return self.payloads

    def wire(self) -> tuple[list[bytes], int | list[int]]:
        """What a JOBS message carries: (per-job pickles, count) or (blobs, jobs per blob)."""
        self._pack()
        if self.blobs is not None and self.blob_counts is not None:
            return self.blobs, self.blob_counts
        return self.pickles(), self.count

    def absorb(self, other: Chunk) -> bool:
        """Append ``other`` if its ids continue ours in the same form; return whether it did."""
        if self.ids is not None or other.ids is not None:
            return False
        if self.first_id + self.count != other.first_id:
            return False
        if self.jobs is not None and other.jobs is not None:
            self.jobs.extend(other.jobs)
        elif self.packed and other.packed:
            self._pack()
            other._pack()
            assert self.blobs is not None and self.blob_counts is not None
            assert other.blobs is not None and other.blob_counts is not None
            self.blobs.extend(other.blobs)
            self.blob_counts.extend(other.blob_counts)
        else:  # mixed forms (rare: around a bad job): both become per-job pickles
            self.pickles().extend(other.pickles())
        self.count += other.count
        return True

    def lowest(self) -> tuple[int, bytes]:
        """The lowest job id here, with its pickle."""
        if self.ids is None:
            if self.head is None:
                jobs = self.jobs
                self.head = pickle.dumps(jobs[0], PICKLE_PROTOCOL) if jobs else self.pickles()[0]
            return self.first_id, self.head
        payloads = self.pickles()
        i = min(range(len(self.ids)), key=self.ids.__getitem__)
        return self.ids[i], payloads[i]

    def split(self, n: int) -> Chunk:
        """Cut off and return the first ``n`` jobs (a packed chunk becomes loose, once)."""
        if self.packed and self.ids is None:
            if self.jobs is None:
                assert self.blobs is not None
                self.jobs = [job for blob in self.blobs for job in pickle.loads(blob)]
                self.blobs = self.blob_counts = None
            jobs = self.jobs
            head = Chunk(self.first_id, None, jobs=jobs[:n], head=self.head)
            self.jobs = jobs[n:]
            self.count = len(self.jobs)
            self.head = None  # pickled when the resume point asks for it
            self.first_id += n
            return head
        payloads = self.pickles()
        head = Chunk(self.first_id, payloads[:n], self.ids[:n] if self.ids else None)
        del payloads[:n]
        self.count = len(payloads)
        self.head = None
        if self.ids is not None:
            del self.ids[:n]
            self.first_id = self.ids[0] if self.ids else self.first_id
        else:
            self.first_id += n
        return head

    def id_list(self) -> list[int]:
        return (
            self.ids
            if self.ids is not None
            else list(range(self.first_id, self.first_id + self.count))
        )


class BadJob(NamedTuple):
    """A job that could not be sent: unpicklable or too large."""

    job_id: int
    job_repr: str
    error: str
    message: str


class GeneratorFailure(NamedTuple):
    job_id: int
    error: str
    message: str
    traceback: str


def safe_repr(obj: object, limit: int = 200) -> str:
    try:
        text = repr(obj)
    except Exception as exc:  # a user's __repr__ may raise anything
        text = f"<unrepresentable {type(obj).__name__}: {exc}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class FeederStats:
    __slots__ = ("replayed",)

    def __init__(self) -> None:
        self.replayed = 0  # jobs skipped because they were already done


class Feeder(threading.Thread):
    """Pulls ``jobs`` (an iterable, started lazily on the thread) into a bounded buffer.

    ``start_id`` is the id of the first job the iterable yields. Jobs whose id satisfies
    ``skip`` are consumed and dropped (already done before a resume). ``on_ready`` is called
    (from the feeder thread) after each chunk while the master waits for jobs.
    """

    def __init__(
        self,
        jobs: Callable[[], Iterable[object]] | Iterable[tuple[int, bytes]],
        *,
        size: int,
        start_id: int = 0,
        skip_below: int = 0,
        skip: Callable[[int], bool] | None = None,
        skip_until: int = 0,
        max_job_bytes: int = 64 * 1024 * 1024,
        on_ready: Callable[[], None] | None = None,
        prepickled: bool = False,
    ) -> None:
        super().__init__(name="taskmaster-feeder", daemon=True)
        self._jobs = jobs
        self.size = size
        self._next_id = start_id
        self._skip_below = skip_below
        self._skip = skip
        self._skip_until = max(skip_until, skip_below)
        self._max_job_bytes = max_job_bytes
        self._on_ready = on_ready
        self._prepickled = prepickled
        self._chunks: collections.deque[Chunk] = collections.deque()
        self._buffered = 0
        self._cond = threading.Condition()
        self._stopping = False
        self.exhausted = False
        self.failure: GeneratorFailure | None = None
        self.first_payload: bytes | None = None
        self.stats = FeederStats()
        self.waiting = False  # set by the master when it has credit and no jobs
        self._bad: list[BadJob] = []
        self.replaying = False
        self.replay_rate: float | None = None  # jobs/s of the last replay, once it is over

    # -- master side ---------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return self._buffered

    @property
    def done(self) -> bool:
        """The generator is finished (or failed) and every chunk has been taken."""
        return self.exhausted and not self._buffered

    def take(self, n: int, *, wait_up_to: int = 0, exact: bool = False) -> list[Chunk]:
        """Remove about ``n`` jobs from the buffer, as chunks of consecutive ids.

        Chunks come whole while they fit in ``n`` or, when ``n`` is big (fast jobs), in twice
        ``n``: splitting a chunk costs an unpickle and re-pickles, and credits rarely line up
        with chunks. The worker's credit goes below zero and its next grants pay that back.
        A chunk too big even for that is split to fit, unless it would fit twice
        ``wait_up_to`` (a busy worker's window): then the rest of the credit waits for the
        worker's next ack and a bigger grant. ``exact`` takes no more than ``n``.
        """
        out: list[Chunk] = []
        overshoot = n if n >= OVERSHOOT_MIN and not exact else 0
        with self._cond:
            if self._bad:
                # Jobs after a bad one wait until the master has taken (and resolved) it:
                # otherwise a checkpoint could move the resume point past an id that is
                # neither done nor held anywhere, and a resume would never record it.
                return out
            chunks = self._chunks
            taken = 0
            while taken < n and chunks:
                head = chunks[0]
                if taken + len(head) <= n + overshoot:
                    chunks.popleft()
                elif len(head) > 2 * wait_up_to:
                    head = head.split(n - taken)
                else:
                    break
                taken += len(head)
                self._buffered -= len(head)
                # Chunks whose ids continue travel in one message.
                if not (out and out[-1].absorb(head)):
                    out.append(head)
            self._cond.notify()
        return out

    def peek_first(self) -> tuple[int, bytes] | None:
        """The lowest buffered job (id, payload): the resume point if nothing is leased."""
        with self._cond:
            if not self._chunks or self._bad:
                return None  # an undrained bad job is lower than the head: no point yet
            return self._chunks[0].lowest()

    @property
    def next_id(self) -> int:
        return self._next_id

    def drain_bad(self) -> list[BadJob]:
        with self._cond:
            bad, self._bad = self._bad, []
        return bad

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # -- feeder thread -------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self._prepickled:
                self._feed_prepickled(iter(self._jobs))  # type: ignore[arg-type]
            else:
                assert callable(self._jobs)
                self._feed(iter(self._jobs()))
        except _Stopped:
            return
        except BaseException as exc:  # the user's generator may raise anything
            self.failure = GeneratorFailure(
                self._next_id,
                type(exc).__name__,
                str(exc)[:4096],
                "".join(tb_module.format_exception(exc))[-16384:],
            )
            logger.error(
                "get_jobs raised at job=%d: %s: %s", self._next_id, type(exc).__name__, exc
            )
        finally:
            with self._cond:
                self.exhausted = True
            self._notify_master()

    def _wait_for_room(self) -> int:
        with self._cond:
            while self._buffered >= self.size and not self._stopping:
                self._cond.wait()
            if self._stopping:
                raise _Stopped
            return self.size - self._buffered

    def _feed(self, jobs: Iterator[object]) -> None:
        if self._next_id < self._skip_below:
            self._replay(jobs)
        want = 1
        while True:
            room = self._wait_for_room()
            started = time.perf_counter()
            items: list[object] = []
            try:
                items.extend(itertools.islice(jobs, min(want, room, MAX_CHUNK)))
            except BaseException:
                # The jobs pulled before the error still run; the failure names the next id.
                if items:
                    self._put(items)
                raise
            if not items:
                return
            elapsed = time.perf_counter() - started
            packed_bytes = self._put(items)
            # Grow chunks while the generator is fast and jobs are small; shrink them when
            # it is slow, or when a chunk weighs more than a message should.
            if packed_bytes > CHUNK_BYTES or elapsed > 10 * CHUNK_FLUSH_S:
                want = max(1, want // 2)
            elif elapsed < CHUNK_FLUSH_S:
                want = min(want * 2, MAX_CHUNK)

    def _replay(self, jobs: Iterator[object]) -> None:
        """Consume the already-done prefix without pickling or sending it."""
        self.replaying = True
        started = time.perf_counter()
        todo = self._skip_below - self._next_id
        while todo > 0:
            if self._stopping:
                raise _Stopped
            step = min(todo, REPLAY_STEP)
            # zip pulls a job before it counts it, so ``counted`` is exact even when the
            # generator raises; the deque drains at C speed.
            counted = itertools.count()
            try:
                collections.deque(
                    zip(itertools.islice(jobs, step), counted, strict=False), maxlen=0
                )
            finally:
                got = next(counted)
                self._next_id += got
                self.stats.replayed += got
            todo -= step
            if got < step:
                break
        elapsed = time.perf_counter() - started
        self.replay_rate = self.stats.replayed / elapsed if elapsed > 0 else 0.0
        logger.warning(
            "replayed %d done jobs in %.1fs (%.0f jobs/s) to reach the resume point",
            self.stats.replayed,
            elapsed,
            self.replay_rate,
        )
        self.replaying = False

    def _put(self, items: list[object]) -> int:
        """Number, pickle and buffer ``items``; return the packed size (0 if not packed)."""
        first_id = self._next_id
        self._next_id += len(items)
        if not self._any_skipped(first_id, len(items)):
            try:
                blob: bytes | None = pickle.dumps(items, PICKLE_PROTOCOL)
            except Exception:
                blob = None
            # A packed chunk within the size limit holds no job over it.
            if blob is not None and len(blob) <= self._max_job_bytes:
                head = pickle.dumps(items[0], PICKLE_PROTOCOL)
                if first_id == 0:
                    self.first_payload = head
                self._push(Chunk(first_id, None, blobs=[blob], blob_counts=[len(items)], head=head))
                return len(blob)
        try:
            payloads = [pickle.dumps(job, PICKLE_PROTOCOL) for job in items]
        except Exception:
            payloads = []
        if len(payloads) == len(items) and first_id == 0:
            self.first_payload = payloads[0]
        self._put_slowly(first_id, items, payloads)
        return 0

    def _any_skipped(self, first_id: int, n: int) -> bool:
        if first_id >= self._skip_until:
            return False
        if first_id + n <= self._skip_below:
            return True
        if self._skip is None:
            return first_id < self._skip_below
        return any(self._skip(i) for i in range(first_id, first_id + n))

    def _put_slowly(self, first_id: int, items: list[object], payloads: list[bytes]) -> None:
        """Per-job path: skip done ids, record unpicklable or oversized jobs, keep the rest."""
        run_ids: list[int] = []
        run_payloads: list[bytes] = []
        for offset, job in enumerate(items):
            job_id = first_id + offset
            if job_id < self._skip_below or (self._skip is not None and self._skip(job_id)):
                self.stats.replayed += 1
                continue
            payload = payloads[offset] if payloads else self._pickle_one(job_id, job)
            if payload is None:
                continue
            if len(payload) > self._max_job_bytes:
                self._record_bad(
                    BadJob(
                        job_id,
                        safe_repr(job),
                        "JobTooLarge",
                        f"pickled job is {len(payload):,} bytes, over --max-job-bytes "
                        f"{self._max_job_bytes:,}",
                    )
                )
                continue
            if job_id == 0:
                self.first_payload = payload
            run_ids.append(job_id)
            run_payloads.append(payload)
        if run_ids:
            contiguous = run_ids[-1] - run_ids[0] + 1 == len(run_ids)
            self._push(Chunk(run_ids[0], run_payloads, None if contiguous else run_ids))

    def _pickle_one(self, job_id: int, job: object) -> bytes | None:
        try:
            return pickle.dumps(job, PICKLE_PROTOCOL)
        except Exception as exc:
            self._record_bad(
                BadJob(job_id, safe_repr(job), "UnpicklableJob", f"{type(exc).__name__}: {exc}")
            )
            return None

    def _record_bad(self, bad: BadJob) -> None:
        logger.warning("job=%d cannot be sent: %s", bad.job_id, bad.message)
        with self._cond:
            self._bad.append(bad)
        self._notify_master()

    def _feed_prepickled(self, jobs: Iterator[tuple[int, bytes]]) -> None:
        """``--retry-failed``: jobs come from the failures table, already pickled."""
        while True:
            room = self._wait_for_room()
            batch = list(itertools.islice(jobs, min(room, MAX_CHUNK)))
            if not batch:
                return
            self._push(Chunk(batch[0][0], [p for _, p in batch], [i for i, _ in batch]))

    def _push(self, chunk: Chunk) -> None:
        with self._cond:
            self._chunks.append(chunk)
            self._buffered += len(chunk)
        if self.waiting:
            # One wake-up per wait is enough: the master sets the flag again if it still needs jobs.
            self.waiting = False
            self._notify_master()

    def _notify_master(self) -> None:
        if self._on_ready is not None:
            self._on_ready()


class _Stopped(Exception):
    """Raised inside the feeder thread when the master stops it."""
