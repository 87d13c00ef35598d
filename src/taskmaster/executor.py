"""Running ``handle_job`` inside a worker process: serially, on threads, or on an event loop.

An executor takes batches from a :class:`JobQueue` (filled by the worker's I/O thread) and
reports results to a :class:`Results` box (drained by the I/O thread). It never touches a
socket, so heartbeats and acknowledgements keep flowing while a job runs.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import pickle
import threading
import time
import traceback as tb_module
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

MAX_TRACEBACK_CHARS = 8000
# Within a long batch, report finished jobs at least this often so the master's ledger and
# progress move on, and a crash re-runs little. Each report wakes the I/O thread, which then
# takes the GIL from the running job: as often as the grants (worker.PREFETCH_S) need anyway.
ACK_INTERVAL_S = 0.2
# The serial executor wakes the I/O thread after a batch only when fewer jobs than the
# queue's ``low_water`` are queued (or ACK_INTERVAL_S has passed); the I/O thread sets it from
# its window, and never below this.
LOW_WATER_JOBS = 2
# The serial executor reads the clock once per this many jobs; jobs slower than SLOW_JOB_S
# run one to a block. Below the low water mark it wakes the I/O thread mid-batch, at most
# once per MIN_POST_GAP_S.
CLOCK_EVERY = 32
SLOW_JOB_S = 0.0005
# Blocks of fast jobs claimed at once: what may still run behind a job that hangs.
CLAIM_BLOCKS = 8
MIN_POST_GAP_S = 0.002

# What a job may raise and still be a failed job rather than the end of its worker:
# sys.exit() inside handle_job is the job's failure; Ctrl-C and SIGTERM stop the worker.
JOB_ERRORS = (Exception, SystemExit)

_loads = pickle.loads
_monotonic = time.monotonic


class Batch:
    """Jobs from one JOBS message: per-job pickles, or pickled lists of jobs (packed)."""

    __slots__ = ("seq", "ids", "payloads", "count", "packed")

    def __init__(
        self,
        seq: int,
        ids: int | list[int],
        payloads: list[bytes],
        count: int = -1,
        packed: bool = False,  # each payload is a pickled list of jobs
    ) -> None:
        self.seq = seq
        self.ids = ids
        self.payloads = payloads
        self.count = count if count >= 0 else len(payloads)
        self.packed = packed

    def job_id(self, offset: int) -> int:
        ids = self.ids
        return ids + offset if isinstance(ids, int) else ids[offset]

    def id_seq(self) -> range | list[int]:
        ids = self.ids
        return range(ids, ids + self.count) if isinstance(ids, int) else ids


def batches(
    queue: JobQueue, results: Results, lock: threading.Lock | None = None
) -> Iterator[tuple[Batch, list[Any], bool]]:
    """Each batch from ``queue`` until it closes, with its items (see :func:`unpack`)."""
    while True:
        batch = queue.get()
        if batch is None:
            return
        unpacked = unpack(batch, results, lock)
        if unpacked is not None:
            yield batch, *unpacked


def unpack(
    batch: Batch, results: Results, lock: threading.Lock | None = None
) -> tuple[list[Any], bool] | None:
    """The batch's items and whether they are jobs already (packed) or pickles to load.

    A packed batch that cannot be unpickled here (say, a class this machine cannot import)
    fails as a whole: every job in it is reported with the error, under ``lock`` when other
    threads record results at the same time.
    """
    if not batch.packed:
        return batch.payloads, False
    try:
        payloads = batch.payloads
        jobs = (
            _loads(payloads[0]) if len(payloads) == 1 else [j for p in payloads for j in _loads(p)]
        )
        if len(jobs) != batch.count:  # never from a sound master: fail it rather than guess
            raise ValueError(f"a batch of {batch.count} jobs held {len(jobs)}")
    except JOB_ERRORS as exc:
        described = describe_exception(exc)
        with lock or contextlib.nullcontext():
            for job_id in batch.id_seq():
                results.failed.append((batch.seq, job_id, *described))
            results.finished += batch.count
            results.post()
        return None
    return jobs, True


class JobQueue:
    """Batches from the I/O thread to the executor; ``close()`` ends the executor's loop."""

    def __init__(self) -> None:
        self._batches: collections.deque[Batch] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.queued_jobs = 0  # read without the lock: an int, only a hint
        self.low_water = LOW_WATER_JOBS  # see LOW_WATER_JOBS
        self.post_every = 1  # finished jobs worth a mid-batch ack: the I/O thread's grant step
        # The batch the executor is handing out, how far into it the executor may have
        # started jobs (it claims them: claim, claim_next), and where take_back() cut it;
        # all under _claims, so that a job is either run here or given back, never both.
        self._claims = threading.Lock()
        self._running: Batch | None = None
        self._claimed = 0
        self._cut: int | None = None

    def put(self, batch: Batch) -> None:
        with self._cond:
            self._batches.append(batch)
            self.queued_jobs += batch.count
            self._cond.notify()

    def get(self, timeout: float | None = None) -> Batch | None:
        with self._cond:
            while not self._batches and not self._closed:
                if not self._cond.wait(timeout):
                    return None
            if not self._batches:
                return None
            batch = self._batches.popleft()
            self.queued_jobs -= batch.count
            return batch

    def take_back(self) -> list[tuple[Batch, int]]:
        """Take the jobs the executor has not started: (batch, offset of its first job taken)
        for the rest of the running batch and for each queued one. None of them starts here.

        Called on the I/O thread while the executor runs, which claims jobs before starting
        them: what it has claimed stays, the rest is cut off.
        """
        taken: list[tuple[Batch, int]] = []
        with self._claims:
            running = self._running
            if running is not None and self._cut is None and self._claimed < running.count:
                self._cut = self._claimed
                taken.append((running, self._claimed))
        with self._cond:
            taken.extend((batch, 0) for batch in self._batches)
            self._batches.clear()
            self.queued_jobs = 0
        return taken

    def drop_unstarted(self) -> int:
        """Take back every job not started (see take_back) and return how many."""
        return sum(batch.count - offset for batch, offset in self.take_back())

    # The executor's side of take_back(): it starts a batch, claims its jobs in order before
    # running them, and finishes it.

    def start(self, batch: Batch) -> None:
        with self._claims:
            self._running, self._claimed, self._cut = batch, 0, None

    def claim(self, end: int) -> int:
        """Claim the running batch's jobs up to offset ``end``; return how far we may go."""
        with self._claims:
            if self._cut is not None:
                end = min(end, self._cut)
            self._claimed = end
            return end

    def claim_next(self) -> bool:
        """Claim the running batch's next job; False if it was given back."""
        with self._claims:
            if self._cut is not None and self._claimed >= self._cut:
                return False
            self._claimed += 1
            return True

    def finish(self) -> None:
        with self._claims:
            self._running = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


def describe_exception(exc: BaseException) -> tuple[str, str, str]:
    text = "".join(tb_module.format_exception(exc))
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "…" + text[-MAX_TRACEBACK_CHARS:]
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable message>"
    return type(exc).__name__, message[:4000], text


class Results:
    """What finished, waiting for the I/O thread: ok runs, failures and timing.

    ``running`` maps job id → (start time, batch seq) for the heartbeat and the ``--timeout``
    watchdog; the serial executor publishes ``current_id`` instead, which costs less per job.
    """

    def __init__(self, wake: Callable[[], None], black_box: memoryview | None = None) -> None:
        self.ok: collections.deque[tuple[int, int, int]] = collections.deque()
        self.failed: collections.deque[tuple[int, int, str, str, str]] = collections.deque()
        self.finished = 0  # jobs finished, ok or not (read by the I/O thread for credit)
        self.busy_s = 0.0  # the sum of the finished jobs' durations
        self.last_post = 0.0
        self.running: dict[int, tuple[float, int]] = {}  # concurrent executors
        # The serial executor's running job (-1 when idle) and its batch seq, in the
        # supervisor's shared black box when there is one (see supervisor.py).
        if black_box is None:
            black_box = memoryview(bytearray(32)).cast("q")
            black_box[0] = -1
        self.black_box = black_box
        self._wake = wake

    @property
    def current_id(self) -> int:
        return int(self.black_box[0])

    @property
    def current_seq(self) -> int:
        return int(self.black_box[1])

    def post(self, now: float | None = None) -> None:
        self.last_post = _monotonic() if now is None else now
        self._wake()


def _offset(id_seq: range | list[int], job_id: int, start: int, end: int) -> int:
    """Where ``job_id`` sits in the batch (it is between ``start`` and ``end``)."""
    if isinstance(id_seq, range):
        return job_id - id_seq.start
    return id_seq.index(job_id, start, end)


class SerialExecutor:
    """One job at a time on the calling (main) thread: the fastest path for CPU-bound jobs.

    Per job it only publishes the job id (``results.black_box[0]``); the I/O thread times
    how long an id stays there, so the hot loop pays no clock call per job.
    """

    slots = 1

    def __init__(self, handle_job: Callable[[Any], Any]) -> None:
        self.handle_job = handle_job

    def run(self, queue: JobQueue, results: Results) -> None:
        handle = self.handle_job
        loads = _loads
        box = results.black_box
        block = 1  # until the first job shows whether jobs are fast
        for batch, items, packed in batches(queue, results):
            seq = batch.seq
            id_seq = batch.id_seq()
            first_id = id_seq.start if isinstance(id_seq, range) else -1
            count = batch.count
            box[1] = seq
            queue.start(batch)
            started = last_post = block_start = _monotonic()
            run_start = 0  # offset where the current run of successes began
            pos = claimed = 0
            while pos < count:
                # Jobs run in blocks with no per-job bookkeeping beyond the black box; the
                # clock is read between blocks. Fast jobs are claimed (see take_back) a few
                # blocks at a time, slow ones one at a time.
                end = min(pos + block, count)
                if end > claimed:
                    ahead = block * CLAIM_BLOCKS if block > 1 else 1
                    claimed = queue.claim(min(pos + ahead, count))
                    if claimed <= pos:
                        count = pos  # the rest was given back
                        break
                    end = min(end, claimed)
                job_id = -1
                try:
                    if packed and first_id >= 0:
                        # The common fast case (a chunk of consecutive ids, unpickled as a
                        # whole): no zip, no tuple per job. 45 ns a no-op job against 62.
                        job_id = first_id + pos
                        for item in items[pos:end]:
                            box[0] = job_id
                            handle(item)
                            job_id += 1
                    else:
                        for job_id, item in zip(id_seq[pos:end], items[pos:end], strict=True):
                            box[0] = job_id
                            handle(item if packed else loads(item))
                    ran = end - pos
                    pos = end
                except JOB_ERRORS as exc:
                    box[0] = -1
                    offset = _offset(id_seq, job_id, pos, end)
                    self._flush_run(results, seq, id_seq, run_start, offset)
                    results.failed.append((seq, job_id, *describe_exception(exc)))
                    results.finished += 1
                    ran = offset + 1 - pos
                    run_start = pos = offset + 1
                    results.post()
                now = _monotonic()
                # Slow jobs run one to a block: the bookkeeping is nothing next to them, and
                # the I/O thread can ask for more while the batch still has work.
                block = 1 if now - block_start > SLOW_JOB_S * max(ran, 1) else CLOCK_EVERY
                block_start = now
                # Acks go out while a long batch runs, and once it is down to the low water
                # mark (counting what is queued behind it) so the next jobs arrive in time.
                # Each such ack is worth a grant (post_every jobs), not one message a job.
                running_low = pos < count and count - pos + queue.queued_jobs < queue.low_water
                if now - last_post > ACK_INTERVAL_S or (
                    running_low
                    and pos - run_start >= queue.post_every
                    and now - last_post > MIN_POST_GAP_S
                ):
                    self._flush_run(results, seq, id_seq, run_start, pos)
                    run_start = pos
                    results.busy_s += now - started
                    started = last_post = now
                    results.post(now)
            box[0] = -1
            queue.finish()
            self._flush_run(results, seq, id_seq, run_start, count)
            now = _monotonic()
            results.busy_s += now - started
            # Wake the I/O thread only when its news matters: the queue runs low (the master
            # must send more) or acks have waited long enough. Each wake-up takes the GIL
            # from this thread for a moment, and costs the master a message.
            if queue.queued_jobs < queue.low_water or now - results.last_post > ACK_INTERVAL_S:
                results.post(now)

    @staticmethod
    def _flush_run(
        results: Results, seq: int, id_seq: range | list[int], start: int, end: int
    ) -> None:
        if end <= start:
            return
        if isinstance(id_seq, range):
            results.ok.append((seq, id_seq[start], end - start))
        else:
            for offset in range(start, end):
                results.ok.append((seq, id_seq[offset], 1))
        results.finished += end - start


class _Concurrent:
    """Shared bookkeeping for executors that run several jobs at once."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when ``active`` drops to 0
        self.active = 0  # jobs handed out whose result is not yet recorded
        self._finished_at_post = 0  # results.finished when the I/O thread was last woken
        self._stopped = False  # interrupted: no job is handed out any more

    def _handing_out(self) -> bool:
        """Count one more job out; False once stopped (the job must not start)."""
        with self._lock:
            if self._stopped:
                return False
            self.active += 1
            return True

    def _stop(self) -> None:
        with self._lock:
            self._stopped = True

    def _post_unposted(self, results: Results) -> None:
        """Wake the I/O thread if results wait for it: a thread is about to wait for jobs,
        and the credit for its slot is what brings them."""
        with self._lock:
            if results.finished != self._finished_at_post:
                self._finished_at_post = results.finished
                results.post()

    def _started(self, results: Results, seq: int, job_id: int) -> None:
        results.running[job_id] = (_monotonic(), seq)

    def _ended(
        self,
        results: Results,
        queue: JobQueue,
        seq: int,
        job_id: int,
        exc: BaseException | None,
    ) -> None:
        now = _monotonic()
        with self._lock:
            started = results.running.pop(job_id, (now, seq))[0]
            results.busy_s += now - started
            if exc is None:
                results.ok.append((seq, job_id, 1))
            else:
                results.failed.append((seq, job_id, *describe_exception(exc)))
            results.finished += 1
            # Wake the I/O thread when its news matters, not for every job: each wake-up
            # takes the GIL from the jobs' threads and sends the master an ACK. It matters
            # when this was the last job out (its result must not wait for a poll timeout),
            # when a grant's worth finished, or (at most every MIN_POST_GAP_S) while the
            # queue runs low. Posted before the count drops: a pool the worker stops
            # waiting for at zero (ThreadExecutor.run) has no wake-up left to write after
            # its pipe is closed.
            if (
                self.active == 1
                or results.finished - self._finished_at_post >= queue.post_every
                or (
                    queue.queued_jobs < queue.low_water and now - results.last_post > MIN_POST_GAP_S
                )
            ):
                self._finished_at_post = results.finished
                results.post(now)
            self.active -= 1
            if not self.active:
                self._idle.notify_all()

    def _wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every job handed out has its result recorded; whether they all have."""
        with self._lock:
            return self._idle.wait_for(lambda: not self.active, timeout)


class _SharedJobs:
    """The jobs of the queue's batches, one at a time, to whichever thread asks first."""

    def __init__(self, queue: JobQueue, results: Results, pool: _Concurrent) -> None:
        self._queue = queue
        self._results = results
        self._pool = pool  # counts each job out under our lock, so before ``drained`` is set
        self._batches = batches(queue, results, pool._lock)
        self._lock = threading.Lock()
        self._current: Iterator[tuple[int, int, Any, bool]] = iter(())
        self._over = False
        self.drained = threading.Event()  # the queue closed and every job was taken

    def take(self) -> tuple[int, int, Any, bool] | None:
        """(seq, job id, item, packed) of the next job, counted out; ``None`` once the queue
        is closed and drained, or the pool stopped. Blocks while the queue is empty."""
        queue = self._queue
        with self._lock:
            while not self._over:
                job = next(self._current, None)
                if job is not None and not queue.claim_next():
                    job = None  # the rest of this batch was given back
                    self._current = iter(())
                if job is not None:
                    if self._pool._handing_out():
                        return job
                    self._over = True  # the pool stopped: no job starts any more
                    break
                queue.finish()
                if not queue.queued_jobs:
                    self._pool._post_unposted(self._results)
                taken = next(self._batches, None)
                if taken is None:
                    self._over = True
                    self.drained.set()
                    break
                batch, items, packed = taken
                queue.start(batch)
                self._current = zip(
                    itertools.repeat(batch.seq), batch.id_seq(), items, itertools.repeat(packed)
                )
            return None


class ThreadExecutor(_Concurrent):
    """``--threads N``: N threads, each taking its next job itself (IO-bound jobs).

    The threads start with the worker, while it is still connecting, and a thread whose job
    ended takes the next one straight from the queue: no dispatcher between jobs, and no
    thread to start when the first jobs arrive.
    """

    def __init__(self, handle_job: Callable[[Any], Any], threads: int) -> None:
        super().__init__(threads)
        self.handle_job = handle_job

    def run(self, queue: JobQueue, results: Results) -> None:
        jobs = _SharedJobs(queue, results, self)
        try:
            for index in range(self.slots):
                threading.Thread(
                    target=self._work, args=(jobs, queue, results),
                    name=f"taskmaster-job-{index}", daemon=True,
                ).start()  # fmt: skip
            # Once the queue is closed and drained, no job starts: the run is over when the
            # last one running has its result recorded. The threads are not waited for: they
            # leave one by one (4 ms for fifty), and end with the process anyway.
            jobs.drained.wait()
            self._wait_idle()
        except BaseException:
            # Interrupted: no job starts any more, and the ones running finish and are
            # recorded before the worker closes its pipe to the I/O thread.
            self._stop()
            self._wait_idle()
            raise

    def _work(self, jobs: _SharedJobs, queue: JobQueue, results: Results) -> None:
        handle = self.handle_job
        while True:
            job = jobs.take()
            if job is None:
                return
            seq, job_id, item, packed = job
            self._started(results, seq, job_id)
            error: BaseException | None = None
            try:
                handle(item if packed else _loads(item))
            except BaseException as exc:
                # No signal reaches this thread: whatever the job raised is its failure
                # (re-raised, it would end the thread with the job counted out forever).
                error = exc
            self._ended(results, queue, seq, job_id, error)


class AsyncExecutor(_Concurrent):
    """An ``async def handle_job``: up to ``--concurrency`` jobs at once on one event loop."""

    def __init__(self, handle_job: Callable[[Any], Any], concurrency: int) -> None:
        super().__init__(concurrency)
        self.handle_job = handle_job
        self._closing = False  # the loop is being shut down: cancelled jobs are not failures

    def run(self, queue: JobQueue, results: Results) -> None:
        """What ``asyncio.run`` does, except that the jobs are told the loop is closing before
        they are cancelled: a job's own ``CancelledError`` (another task cancelled it, or a
        future it awaited) is its failure; the loop's cancelling it on Ctrl-C is not."""
        import asyncio

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(queue, results))
        finally:
            self._closing = True
            try:
                left = asyncio.all_tasks(loop)
                for task in left:
                    task.cancel()
                if left:
                    loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    async def _main(self, queue: JobQueue, results: Results) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.slots)
        tasks: set[asyncio.Task[None]] = set()
        while True:
            batch = queue.get(0) or await loop.run_in_executor(None, queue.get)
            if batch is None:
                break
            unpacked = unpack(batch, results)
            if unpacked is None:
                continue
            items, packed = unpacked
            queue.start(batch)
            for job_id, item in zip(batch.id_seq(), items, strict=True):
                await slots.acquire()
                if not queue.claim_next():
                    slots.release()  # the rest of this batch was given back
                    break
                self._handing_out()
                task = loop.create_task(
                    self._one(results, queue, slots, batch.seq, job_id, item, packed)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            queue.finish()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(
        self,
        results: Results,
        queue: JobQueue,
        slots: asyncio.Semaphore,
        seq: int,
        job_id: int,
        item: Any,
        packed: bool,
    ) -> None:
        import asyncio  # loaded by run(): a lookup

        self._started(results, seq, job_id)
        error: BaseException | None = None
        try:
            await self.handle_job(item if packed else _loads(item))
        except JOB_ERRORS as exc:
            error = exc
        except asyncio.CancelledError as exc:
            if self._closing:
                raise  # the loop is shutting down (Ctrl-C): the job is not over, not failed
            error = exc  # the job's own (it, or a future it awaited, was cancelled): its failure
        finally:
            slots.release()
        self._ended(results, queue, seq, job_id, error)


def _is_coroutine_function(func: Callable[..., Any]) -> bool:
    code = getattr(func, "__code__", None)
    if code is not None:
        return bool(code.co_flags & 0x80)  # CO_COROUTINE, without importing inspect
    import inspect

    return inspect.iscoroutinefunction(func)


def preload(handle_job: Callable[[Any], Any]) -> None:
    """Import what the executor for ``handle_job`` will need, once, before workers fork."""
    if _is_coroutine_function(handle_job):
        import asyncio  # noqa: F401  13 ms: paid by the supervisor, not by each worker


def make_executor(
    handle_job: Callable[[Any], Any], *, threads: int = 1, concurrency: int = 1
) -> SerialExecutor | ThreadExecutor | AsyncExecutor:
    if _is_coroutine_function(handle_job):
        return AsyncExecutor(handle_job, max(1, concurrency))
    if threads > 1:
        return ThreadExecutor(handle_job, threads)
    return SerialExecutor(handle_job)


def executor_slots(executor: SerialExecutor | ThreadExecutor | AsyncExecutor) -> int:
    return executor.slots
