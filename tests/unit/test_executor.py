"""The serial executor alone: every job of a batch is reported exactly once, ok or failed."""

from __future__ import annotations

import pickle
import time

import pytest

from taskmaster import executor
from taskmaster.executor import CLOCK_EVERY, Batch, JobQueue, Results, SerialExecutor


def _run(batch: Batch, handle: object) -> Results:
    queue = JobQueue()
    results = Results(lambda: None)
    queue.put(batch)
    queue.close()
    SerialExecutor(handle).run(queue, results)  # type: ignore[arg-type]
    return results


def _outcome(results: Results) -> tuple[list[int], list[int]]:
    ok = [job_id for _, first, n in results.ok for job_id in range(first, first + n)]
    failed = [job_id for _, job_id, *_ in results.failed]
    return ok, failed


def _fails_on_multiples_of_7(job: int) -> None:
    if job % 7 == 0:
        raise ValueError(job)


@pytest.mark.parametrize("count", [1, CLOCK_EVERY - 1, CLOCK_EVERY, 3 * CLOCK_EVERY + 5])
def test_a_packed_batch_reports_each_job_once(count: int) -> None:
    jobs = list(range(100, 100 + count))
    batch = Batch(9, 100, [pickle.dumps(jobs)], count, packed=True)
    results = _run(batch, _fails_on_multiples_of_7)
    ok, failed = _outcome(results)
    assert failed == [j for j in jobs if j % 7 == 0]
    assert sorted(ok + failed) == jobs and len(ok) == len(set(ok))
    assert results.finished == count
    assert {seq for seq, *_ in results.ok} <= {9}
    assert results.black_box[0] == -1


def test_explicit_ids_keep_their_jobs_across_blocks_and_failures() -> None:
    ids = [3 * i + 1 for i in range(2 * CLOCK_EVERY + 10)]
    payloads = [pickle.dumps(job_id * 10) for job_id in ids]
    batch = Batch(4, ids, payloads)
    seen: list[int] = []

    def handle(job: int) -> None:
        seen.append(job)
        if job % 4 == 0 or job == ids[CLOCK_EVERY - 1] * 10:
            raise RuntimeError("no")

    results = _run(batch, handle)
    ok, failed = _outcome(results)
    assert seen == [job_id * 10 for job_id in ids]
    assert failed == [i for i in ids if (i * 10) % 4 == 0 or i == ids[CLOCK_EVERY - 1]]
    assert sorted(ok + failed) == ids
    assert results.finished == len(ids)


def test_a_batch_of_slow_jobs_asks_for_more_before_it_runs_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 5 ms jobs on a fake clock: once fewer than low_water jobs are left, each finished job
    # is acked at once (the I/O thread then grants credit), not at the end of the batch.
    clock = [100.0]
    monkeypatch.setattr(executor, "_monotonic", lambda: clock[0])
    acked_when_started: list[int] = []
    queue = JobQueue()
    queue.low_water = 4
    wakes: list[int] = []
    results = Results(lambda: wakes.append(results.finished))

    def slow_job(job: int) -> None:
        acked_when_started.append(sum(n for _, _, n in results.ok))
        clock[0] += 0.005

    queue.put(Batch(1, 0, [pickle.dumps(list(range(6)))], 6, packed=True))
    queue.close()
    SerialExecutor(slow_job).run(queue, results)
    # Jobs 0-2 leave 5, 4, 3 behind them: 3 < 4 after job 2, so jobs 3, 4 and 5 each start
    # with everything before them already acked.
    assert acked_when_started == [0, 0, 0, 3, 4, 5]
    assert wakes[:3] == [3, 4, 5] and results.finished == 6


def test_the_thread_pool_waits_for_jobs_still_running_when_the_queue_closes() -> None:
    import threading

    started = threading.Event()

    def slow(job: int) -> None:
        started.set()
        threading.Event().wait(0.2)  # a job still running when the run is told to stop

    queue = JobQueue()
    results = Results(lambda: None)
    pool = executor.ThreadExecutor(slow, threads=4)
    queue.put(Batch(1, 0, [pickle.dumps(0), pickle.dumps(1)]))
    runner = threading.Thread(target=pool.run, args=(queue, results))
    runner.start()
    assert started.wait(10)
    queue.close()
    runner.join(10)
    assert not runner.is_alive()
    assert results.finished == 2 and pool.active == 0  # recorded before run() returned


def test_an_idle_thread_pool_returns_with_every_result_recorded() -> None:
    queue = JobQueue()
    results = Results(lambda: None)
    pool = executor.ThreadExecutor(lambda job: None, threads=8)
    queue.put(Batch(1, 0, [pickle.dumps(i) for i in range(20)]))
    queue.close()
    pool.run(queue, results)
    assert results.finished == 20 and pool.active == 0


def test_a_packed_batch_with_explicit_ids_reports_each_job_once() -> None:
    ids = [5 * i + 2 for i in range(CLOCK_EVERY + 9)]
    batch = Batch(3, ids, [pickle.dumps(ids)], len(ids), packed=True)
    results = _run(batch, _fails_on_multiples_of_7)
    ok, failed = _outcome(results)
    assert failed == [i for i in ids if i % 7 == 0]
    assert sorted(ok + failed) == ids and len(ok) == len(set(ok))


def test_a_packed_batch_whose_count_is_wrong_fails_whole_rather_than_ack_unrun_jobs() -> None:
    ran: list[int] = []
    batch = Batch(2, 10, [pickle.dumps([10, 11])], 5, packed=True)  # says 5, holds 2
    results = _run(batch, ran.append)
    ok, failed = _outcome(results)
    assert ran == [] and ok == []
    assert failed == [10, 11, 12, 13, 14]
    assert results.failed[0][2] == "ValueError"


def _all_out(
    threads: int, *, low_water: int, post_every: int
) -> tuple[JobQueue, Results, list[int], executor.ThreadExecutor]:
    """A pool with all its threads' jobs out, and the finished counts at each wake-up."""
    queue = JobQueue()
    queue.low_water, queue.post_every = low_water, post_every
    wakes: list[int] = []
    results = Results(lambda: wakes.append(results.finished))
    pool = executor.ThreadExecutor(lambda job: None, threads=threads)
    for _ in range(threads):
        pool._handing_out()
    return queue, results, wakes, pool


def test_a_concurrent_executor_wakes_the_io_thread_per_grant_not_per_job() -> None:
    # Five jobs out at once, none of the queue's low water left to wait for: the I/O thread
    # hears of the third (a grant's worth, post_every=3) and of the last one out (whose
    # result must not wait for a poll timeout), not of each.
    queue, results, wakes, pool = _all_out(5, low_water=0, post_every=3)
    for job_id in range(5):
        pool._started(results, 1, job_id)
    for job_id in range(5):
        pool._ended(results, queue, 1, job_id, None)
    assert wakes == [3, 5]
    assert results.finished == 5 and pool.active == 0


def test_a_concurrent_executor_wakes_the_io_thread_while_its_queue_runs_low(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Below the low water mark each finished job may be worth new credit: a wake-up at most
    # every MIN_POST_GAP_S (a fake clock here), even with no grant's worth finished.
    clock = [50.0]
    monkeypatch.setattr(executor, "_monotonic", lambda: clock[0])
    queue, results, wakes, pool = _all_out(8, low_water=4, post_every=1000)
    for job_id, step in enumerate([0.001, 0.0005, 0.0005, 0.003, 0.001, 0.0015, 0.0001]):
        clock[0] += step
        pool._ended(results, queue, 1, job_id, None)
    # Posts at 1 ms (first, last post at 0), at 5 ms (4 ms after), at 7.5 ms (2.5 ms after).
    assert wakes == [1, 4, 6]


def test_the_thread_pool_has_its_threads_before_the_first_jobs_arrive() -> None:
    import threading

    queue = JobQueue()
    results = Results(lambda: None)
    pool = executor.ThreadExecutor(lambda job: None, threads=6)
    runner = threading.Thread(target=pool.run, args=(queue, results))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while sum(t.name.startswith("taskmaster-job-") for t in threading.enumerate()) < 6:
            assert time.monotonic() < deadline, "the pool's threads did not start"
            time.sleep(0.001)
    finally:
        queue.close()
        runner.join(10)
    assert not runner.is_alive() and results.finished == 0


def test_the_thread_pool_runs_at_most_its_threads_jobs_at_once_and_records_every_one() -> None:
    import threading

    lock = threading.Lock()
    running, peak = [0], [0]

    def job(n: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1

    queue = JobQueue()
    results = Results(lambda: None)
    pool = executor.ThreadExecutor(job, threads=4)
    queue.put(Batch(1, 0, [pickle.dumps(list(range(30)))], 30, packed=True))
    queue.put(Batch(2, [100, 101], [pickle.dumps(100), pickle.dumps(101)]))
    queue.close()
    pool.run(queue, results)
    ok, failed = _outcome(results)
    assert sorted(ok) == [*range(30), 100, 101] and failed == []
    assert 1 < peak[0] <= 4 and pool.active == 0


def test_a_thread_job_raising_a_base_exception_is_its_failure_and_the_run_ends() -> None:
    class Stop(BaseException):
        pass

    def job(n: int) -> None:
        if n == 1:
            raise Stop("not an Exception")

    queue = JobQueue()
    results = Results(lambda: None)
    pool = executor.ThreadExecutor(job, threads=2)
    queue.put(Batch(1, 0, [pickle.dumps([0, 1, 2])], 3, packed=True))
    queue.close()
    pool.run(queue, results)
    ok, failed = _outcome(results)
    assert sorted(ok) == [0, 2] and failed == [1] and results.failed[0][2] == "Stop"
    assert pool.active == 0


def test_a_thread_about_to_wait_for_jobs_wakes_the_io_thread_for_its_credit() -> None:
    # The fast job's result is neither a grant's worth nor the last out (the slow job still
    # runs), but its thread has nothing left to run: the I/O thread must hear of it now, not
    # at its next poll timeout, or the free thread waits for credit.
    import threading

    release, woken = threading.Event(), threading.Event()

    def job(n: int) -> None:
        if n == 1:
            release.wait(10)

    queue = JobQueue()
    queue.low_water, queue.post_every = 0, 100
    results = Results(lambda: woken.set() if results.finished == 1 else None)
    pool = executor.ThreadExecutor(job, threads=2)
    queue.put(Batch(1, 0, [pickle.dumps([0, 1])], 2, packed=True))
    runner = threading.Thread(target=pool.run, args=(queue, results))
    runner.start()
    try:
        assert woken.wait(10), "the finished job was not posted"
        assert results.finished == 1 and pool.active == 1
    finally:
        release.set()
        queue.close()
        runner.join(10)
    assert results.finished == 2


def test_a_stopped_pool_hands_out_no_more_jobs() -> None:
    queue = JobQueue()
    results = Results(lambda: None)
    pool = executor.ThreadExecutor(lambda job: None, threads=1)
    jobs = executor._SharedJobs(queue, results, pool)
    queue.put(Batch(1, 0, [pickle.dumps([0, 1])], 2, packed=True))
    assert jobs.take() is not None and pool.active == 1
    pool._stop()
    assert jobs.take() is None and pool.active == 1


def test_an_interrupted_thread_pool_finishes_its_running_job_and_starts_no_other() -> None:
    import signal
    import threading

    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def job(n: int) -> None:
        ran.append(n)
        started.set()
        release.wait(10)

    queue = JobQueue()
    results = Results(lambda: None)
    pool = executor.ThreadExecutor(job, threads=1)
    queue.put(Batch(1, 0, [pickle.dumps([0, 1, 2])], 3, packed=True))

    def interrupt() -> None:
        assert started.wait(10)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)  # Ctrl-C
        deadline = time.monotonic() + 10
        while not pool._stopped and time.monotonic() < deadline:
            time.sleep(0.001)
        release.set()  # the running job ends only once the pool has stopped

    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.run(queue, results)
    finally:
        release.set()
        interrupter.join(10)
        queue.close()
    assert ran == [0] and results.finished == 1 and pool.active == 0
