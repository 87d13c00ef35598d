"""The serial executor alone: every job of a batch is reported exactly once, ok or failed."""

from __future__ import annotations

import pickle

import pytest

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
