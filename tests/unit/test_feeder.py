"""The feeder alone, on its real thread: bounded buffer, skipping, replay, bad jobs, errors."""

from __future__ import annotations

import itertools
import pickle
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from taskmaster.feeder import OVERSHOOT_MIN, Chunk, Feeder
from taskmaster.ledger import Checkpoint, CompletedSet, Ledger
from taskmaster.options import MasterOptions
from taskmaster.serving import _resume_jobs
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(30)


def _drain(feeder: Feeder, n: int = 1000) -> list[tuple[int, object]]:
    """Take everything until the feeder is done: (id, job) in the order handed out."""
    out: list[tuple[int, object]] = []
    while True:
        chunks = feeder.take(n)
        for chunk in chunks:
            out.extend(zip(chunk.id_list(), map(pickle.loads, chunk.pickles()), strict=True))
        if not chunks:
            if feeder.done:
                return out
            wait_until(lambda: feeder.buffered or feeder.done or _bad_waiting(feeder), 10, 0.001)


def _started(feeder: Feeder) -> Feeder:
    feeder.start()
    return feeder


def _bad_waiting(feeder: Feeder) -> bool:
    return bool(feeder._bad)  # no public peek: draining would take them


def test_jobs_are_numbered_in_generator_order() -> None:
    feeder = _started(Feeder(lambda: iter("abcdefg"), size=3))
    got = _drain(feeder, n=2)
    assert got == list(enumerate("abcdefg"))
    assert feeder.exhausted and feeder.failure is None
    assert pickle.loads(feeder.first_payload or b"") == "a"


def test_a_billion_job_generator_stays_size_ahead() -> None:
    pulled = itertools.count()

    def jobs() -> Iterator[int]:
        for i in range(10**9):
            next(pulled)
            yield i

    feeder = _started(Feeder(jobs, size=500))
    try:
        wait_until(lambda: feeder.buffered == 500)
        # Give it every chance to run ahead: it must stay blocked on the full buffer.
        for _ in range(20):
            threading.Event().wait(0.005)
            assert feeder.buffered == 500 and feeder.next_id == 500
        taken = sum(len(c) for c in feeder.take(120))
        assert 120 <= taken <= 240  # a chunk may come whole rather than split (see take)
        wait_until(lambda: feeder.buffered == 500)
        assert feeder.next_id == 500 + taken
        assert next(pulled) <= 500 + taken + 1  # nor was the generator pulled further
    finally:
        feeder.stop()
        feeder.join(5)
    assert not feeder.is_alive()


def test_take_merges_consecutive_chunks_and_respects_n() -> None:
    feeder = _started(Feeder(lambda: range(50), size=100))
    wait_until(lambda: feeder.exhausted)
    chunks = feeder.take(30)
    assert sum(map(len, chunks)) == 30
    assert [c.id_list() for c in chunks] == [list(range(30))]
    first = feeder.peek_first()
    assert first is not None and first[0] == 30 and pickle.loads(first[1]) == 30
    assert sum(map(len, feeder.take(100))) == 20
    assert feeder.done and feeder.peek_first() is None


@pytest.mark.parametrize(
    ("credit", "head", "taken"),
    [
        (OVERSHOOT_MIN, 2 * OVERSHOOT_MIN, 2 * OVERSHOOT_MIN),  # whole, credit overshot
        (OVERSHOOT_MIN, 2 * OVERSHOOT_MIN + 1, OVERSHOOT_MIN),  # too big: split
        (OVERSHOOT_MIN - 1, OVERSHOOT_MIN, OVERSHOOT_MIN - 1),  # small credit: never over
    ],
)
def test_take_sends_a_first_chunk_up_to_twice_a_big_credit_whole(
    credit: int, head: int, taken: int
) -> None:
    feeder = Feeder(lambda: iter(()), size=10_000)
    feeder._push(_packed(0, list(range(head))))  # no public way to place a chunk
    feeder._push(_packed(head, [head]))
    chunks = feeder.take(credit)
    assert [c.id_list() for c in chunks] == [list(range(taken))]
    assert feeder.buffered == head + 1 - taken


def test_done_ids_are_skipped_and_never_pickled() -> None:
    done = CompletedSet(10, [(12, 15), (20, 1000)])
    pickled: list[int] = []

    class Job:
        def __init__(self, i: int) -> None:
            self.i = i

        def __reduce__(self) -> tuple[object, ...]:
            pickled.append(self.i)
            return (int, (self.i,))

    feeder = _started(
        Feeder(
            lambda: (Job(i) for i in range(5, 1005)),
            size=10_000,
            start_id=5,
            skip_below=done.watermark,
            skip=done.__contains__,
            skip_until=done.highest,
        )
    )
    got = _drain(feeder)
    expected = [10, 11, 15, 16, 17, 18, 19, *range(1000, 1005)]
    assert [i for i, _ in got] == expected
    assert [job for _, job in got] == expected  # ids and jobs stay aligned
    assert feeder.stats.replayed == 1000 - len(expected)
    assert not set(pickled) & set(range(5, 10)), "the replayed prefix is not pickled"


def test_replay_from_the_start_skips_the_done_prefix() -> None:
    # A get_jobs without `last`: numbered from 0, the first W consumed without being sent.
    feeder = _started(Feeder(lambda: iter(range(300_000)), size=1000, skip_below=250_000))
    got = _drain(feeder)
    assert [i for i, _ in got] == list(range(250_000, 300_000))
    assert all(i == job for i, job in got)
    assert feeder.stats.replayed == 250_000
    assert feeder.replay_rate is not None and feeder.replay_rate > 0
    assert feeder.first_payload is None  # job 0 was replayed, not produced


def test_replay_of_a_generator_shorter_than_the_watermark() -> None:
    feeder = _started(Feeder(lambda: iter(range(100)), size=10, skip_below=1000))
    assert _drain(feeder) == []
    assert feeder.stats.replayed == 100 and feeder.failure is None


def test_unpicklable_and_oversized_jobs_are_reported_as_bad() -> None:
    jobs = [0, 1, lambda: None, 3, b"x" * 5000, 5, threading.Lock(), 7]
    feeder = _started(Feeder(lambda: iter(jobs), size=100, max_job_bytes=1000))
    got: list[int] = []
    bad = []
    while not feeder.done or _bad_waiting(feeder):
        bad.extend(feeder.drain_bad())
        for chunk in feeder.take(100):
            got.extend(chunk.id_list())
    bad.extend(feeder.drain_bad())
    assert got == [0, 1, 3, 5, 7]
    assert [(b.job_id, b.error) for b in bad] == [
        (2, "UnpicklableJob"),
        (4, "JobTooLarge"),
        (6, "UnpicklableJob"),
    ]
    assert "5,0" in bad[1].message  # the size, readable
    assert "lock" in bad[2].job_repr


def test_jobs_after_a_bad_one_wait_until_the_master_took_it() -> None:
    # Otherwise a checkpoint could record a resume point past an id nobody holds.
    feeder = _started(Feeder(lambda: iter([0, lambda: None, 2, 3]), size=100))
    wait_until(lambda: feeder.exhausted)
    assert feeder.peek_first() is None
    assert feeder.take(100) == []
    assert [b.job_id for b in feeder.drain_bad()] == [1]
    first = feeder.peek_first()
    assert first is not None and first[0] == 0
    assert [c.id_list() for c in feeder.take(100)] == [[0], [2, 3]]


def test_a_raising_generator_sets_failure_with_the_job_id() -> None:
    def jobs() -> Iterator[int]:
        yield from range(37)
        raise RuntimeError("database went away")

    feeder = _started(Feeder(jobs, size=1000))
    got = _drain(feeder)
    # The jobs pulled before the error are all handed out, none lost with the chunk.
    assert [i for i, _ in got] == list(range(37))
    assert feeder.failure is not None
    assert feeder.failure.job_id == 37
    assert feeder.failure.error == "RuntimeError"
    assert feeder.failure.message == "database went away"
    assert "database went away" in feeder.failure.traceback
    assert feeder.exhausted


def test_a_generator_raising_during_replay_names_the_exact_id() -> None:
    def jobs() -> Iterator[int]:
        yield from range(123_456)
        raise KeyError("gone")

    feeder = _started(Feeder(jobs, size=10, skip_below=200_000))
    assert _drain(feeder) == []
    assert feeder.failure is not None and feeder.failure.job_id == 123_456


def test_get_jobs_raising_before_its_first_job() -> None:
    def jobs() -> Iterator[int]:
        raise ValueError("bad kwargs")

    feeder = _started(Feeder(jobs, size=10))
    wait_until(lambda: feeder.exhausted)
    assert feeder.failure is not None and feeder.failure.job_id == 0


def test_stop_ends_a_blocked_feeder() -> None:
    feeder = _started(Feeder(lambda: itertools.count(), size=10))
    wait_until(lambda: feeder.buffered == 10)
    feeder.stop()
    feeder.join(5)
    assert not feeder.is_alive() and feeder.failure is None


def test_on_ready_wakes_a_waiting_master() -> None:
    woken = threading.Event()
    release = threading.Event()

    def jobs() -> Iterator[int]:
        release.wait(10)
        yield 1

    feeder = Feeder(jobs, size=10, on_ready=woken.set)
    feeder.waiting = True
    feeder.start()
    assert not woken.wait(0.05)
    release.set()
    assert woken.wait(5)


def test_prepickled_jobs_keep_their_ids() -> None:
    items = [(7, pickle.dumps("a")), (19, pickle.dumps("b")), (20, pickle.dumps("c"))]
    feeder = _started(Feeder(items, size=10, prepickled=True))
    assert _drain(feeder) == [(7, "a"), (19, "b"), (20, "c")]


def test_chunk_split_keeps_ids_and_payloads_aligned() -> None:
    chunk = Chunk(5, [b"a", b"b", b"c", b"d"], [5, 9, 10, 30])
    head = chunk.split(2)
    assert (head.id_list(), head.payloads) == ([5, 9], [b"a", b"b"])
    assert (chunk.first_id, chunk.id_list(), chunk.payloads) == (10, [10, 30], [b"c", b"d"])
    plain = Chunk(0, [b"a", b"b", b"c"])
    assert plain.split(1).id_list() == [0] and plain.id_list() == [1, 2]


def _packed(first_id: int, *lists: list[int]) -> Chunk:
    blobs = [pickle.dumps(jobs) for jobs in lists]
    return Chunk(first_id, None, blobs=blobs, blob_counts=[len(j) for j in lists])


def _wired(chunk: Chunk) -> tuple[int, list[int]]:
    payloads, counts = chunk.wire()
    if isinstance(counts, int):
        return chunk.first_id, [pickle.loads(p) for p in payloads]
    return chunk.first_id, [job for blob in payloads for job in pickle.loads(blob)]


def test_a_packed_chunk_taken_in_pieces_is_unpickled_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunk = _packed(100, list(range(100, 110)), list(range(110, 120)))
    loads = pickle.loads
    calls = []

    def counting_loads(data: bytes) -> object:
        calls.append(1)
        return loads(data)

    monkeypatch.setattr(pickle, "loads", counting_loads)
    pieces = [chunk.split(n) for n in (3, 1, 7, 4)]
    monkeypatch.undo()
    assert len(calls) == 2  # one per blob, on the first split only
    assert [_wired(p) for p in pieces] == [
        (100, [100, 101, 102]),
        (103, [103]),
        (104, list(range(104, 111))),
        (111, [111, 112, 113, 114]),
    ]
    assert chunk.lowest() == (115, pickle.dumps(115, pickle.HIGHEST_PROTOCOL))
    assert _wired(chunk) == (115, list(range(115, 120)))


def test_loose_and_packed_pieces_merge_back_in_order() -> None:
    chunk = _packed(0, list(range(10)))
    a, b = chunk.split(4), chunk.split(3)
    assert a.absorb(b) and a.absorb(_packed(7, [7, 8])) and not a.absorb(_packed(50, [50]))
    assert _wired(a) == (0, list(range(9)))
    assert len(a) == 9 and a.packed
    assert a.pickles() == [pickle.dumps(i, pickle.HIGHEST_PROTOCOL) for i in range(9)]


# -- where a resumed feeder starts (serving._resume_jobs) --------------------------------------


def _resumable_ledger(tmp_path: Path, watermark: int, ranges: list[tuple[int, int]]) -> Ledger:
    ledger = Ledger.open(tmp_path / "state.db", {"target": "t", "kwargs": {}})
    ledger.completed = CompletedSet(watermark, ranges)
    ledger.checkpoint(
        Checkpoint(
            resume_id=watermark,
            resume_job=pickle.dumps(f"job{watermark}"),
            first_job=pickle.dumps("job0"),
            done=watermark,
        )
    )
    ledger.close()
    return Ledger.open(tmp_path / "state.db", {"target": "t", "kwargs": {}})


def _resumed(
    tmp_path: Path, get_jobs: Callable[..., Iterable[str]], feeders: list[Feeder] | None = None
) -> list[tuple[int, object]]:
    """Run the feeder the way serve_master sets it up on resume; (id, job) handed out."""
    ledger = _resumable_ledger(tmp_path, 100, [(102, 105)])
    try:
        jobs, start_id = _resume_jobs(MasterOptions(get_jobs=get_jobs), ledger)
        done = ledger.completed
        feeder = Feeder(
            jobs, size=1000, start_id=start_id, skip_below=done.watermark,
            skip=done.__contains__, skip_until=done.highest,
        )  # fmt: skip
        feeder.start()
        if feeders is not None:
            feeders.append(feeder)
        return _drain(feeder)
    finally:
        ledger.close()


EXPECTED = [(i, f"job{i}") for i in (100, 101, *range(105, 120))]


def test_resume_with_last_starts_at_the_watermark(tmp_path: Path) -> None:
    calls: list[object] = []

    def get_jobs(last: str | None = None) -> Iterator[str]:
        calls.append(last)
        start = int(last[3:]) if last else 0
        yield from (f"job{i}" for i in range(start, 120))

    assert _resumed(tmp_path, get_jobs) == EXPECTED
    assert calls == ["job100"]


def test_resume_without_last_replays(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def get_jobs() -> Iterator[str]:
        yield from (f"job{i}" for i in range(120))

    assert _resumed(tmp_path, get_jobs) == EXPECTED
    assert "takes no `last`: replaying 100 done jobs" in caplog.text
    assert "replayed 100 done jobs" in caplog.text


def test_resume_of_a_get_jobs_that_ignores_last(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def get_jobs(last: str = "0") -> Iterator[str]:  # the 2012 article's shape
        yield from (f"job{i}" for i in range(120))

    assert _resumed(tmp_path, get_jobs) == EXPECTED
    assert "ignores `last`" in caplog.text


def test_resume_when_the_first_job_matches_neither(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def get_jobs(last: str | None = None) -> Iterator[str]:
        yield from (f"other{i}" for i in range(3))

    got = _resumed(tmp_path, get_jobs)
    assert [i for i, _ in got] == [100, 101]  # numbered from the resume id, as promised
    assert any(
        r.levelname == "ERROR" and "must yield `last` first" in r.message for r in caplog.records
    )


def test_resume_compares_by_value_when_pickles_differ(tmp_path: Path) -> None:
    ledger = _resumable_ledger(tmp_path, 3, [])
    try:
        # An equal job whose pickle differs (a set built in another order).
        ledger.checkpoint_row.resume_job = pickle.dumps({"a", "b", "c", "d", "e"})
        jobs, start_id = _resume_jobs(
            MasterOptions(get_jobs=lambda last=None: iter([{"e", "d", "c", "b", "a"}])), ledger
        )
        assert start_id == 3 and list(jobs()) == [{"a", "b", "c", "d", "e"}]
    finally:
        ledger.close()


def test_resume_with_get_jobs_raising_at_once(tmp_path: Path) -> None:
    def get_jobs(last: str | None = None) -> Iterator[str]:
        raise ConnectionError("no database")
        yield "never"

    feeders: list[Feeder] = []
    assert _resumed(tmp_path, get_jobs, feeders) == []
    failure = feeders[0].failure
    assert failure is not None and failure.job_id == 100 and failure.error == "ConnectionError"
