"""The worker without sockets: the Session's credit and message handling over a fake
transport, ``_merge``, and the executors fed from a JobQueue into a Results box."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskmaster import executor as executor_module
from taskmaster import protocol
from taskmaster import worker as worker_module
from taskmaster.executor import (
    AsyncExecutor,
    Batch,
    JobQueue,
    Results,
    SerialExecutor,
    ThreadExecutor,
    executor_slots,
    make_executor,
)
from taskmaster.worker import (
    EXIT_GAVE_UP,
    EXIT_OK,
    GIVE_BACK_AFTER_S,
    HELLO_RETRY_S,
    MAX_WINDOW,
    PREFETCH_S,
    ROUND_TRIP_S,
    Session,
    _merge,
)
from tests.conftest import FakeClock

pytestmark = pytest.mark.timeout(30)


class FakeWorkerTransport:
    """What a Session needs of a WorkerTransport; sent frames are decoded as the master would."""

    address = "tcp://127.0.0.1:1"
    resets = 0

    def __init__(self) -> None:
        self.sent: list[protocol.WorkerMessage] = []
        self.raw: list[bytes] = []
        self.inbox: list[bytes] = []
        self.closed = False

    def send(self, frame: bytes) -> None:
        self.raw.append(frame)
        self.sent.append(protocol.decode_from_worker(frame))

    def poll(self, timeout_s: float) -> bool:
        return bool(self.inbox)

    def receive(self) -> Iterator[bytes]:
        frames, self.inbox = self.inbox, []
        yield from frames

    def close(self, linger_s: float = 2.0) -> None:
        self.closed = True

    def take(self, kind: type | None = None) -> list[Any]:
        taken = [m for m in self.sent if kind is None or isinstance(m, kind)]
        self.sent = [m for m in self.sent if m not in taken]
        return taken


def make_session(slots: int = 1, wait_s: float = 60.0) -> tuple[Session, FakeWorkerTransport]:
    transport = FakeWorkerTransport()
    session = Session(
        transport,  # type: ignore[arg-type]
        JobQueue(),
        Results(lambda: None),
        -1,
        slots=slots,
        wait_s=wait_s,
        clock=FakeClock(),
    )
    return session, transport


CONFIG = {"heartbeat_s": 0.5, "liveness_s": 3.0, "timeout_s": None}


def welcome(session: Session, epoch: int = 7, config: dict[str, Any] | None = None) -> None:
    session.handle(protocol.welcome(epoch, config or CONFIG), session.clock())


def jobs_frame(seq: int, first: int, n: int) -> bytes:
    return protocol.jobs(seq, first, [pickle.dumps(i) for i in range(first, first + n)])


# -- _merge ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("acks", "merged"),
    [
        ([], []),
        ([(1, 0, 3)], [(1, 0, 3)]),
        ([(1, 0, 3), (1, 3, 2)], [(1, 0, 5)]),
        ([(1, 0, 1), (1, 1, 1), (1, 2, 1)], [(1, 0, 3)]),
        ([(1, 0, 3), (2, 3, 2)], [(1, 0, 3), (2, 3, 2)]),  # another batch: kept apart
        ([(1, 0, 3), (1, 4, 2)], [(1, 0, 3), (1, 4, 2)]),  # a gap (a failure): kept apart
        ([(1, 5, 1), (1, 3, 1)], [(1, 5, 1), (1, 3, 1)]),  # out of order: kept apart
        ([(1, 0, 2), (2, 2, 2), (2, 4, 1)], [(1, 0, 2), (2, 2, 3)]),
    ],
)
def test_merge(acks: list[tuple[int, int, int]], merged: list[tuple[int, int, int]]) -> None:
    assert _merge(acks) == merged


def test_merge_keeps_every_id() -> None:
    rng = random.Random(5)
    acks = []
    for seq in range(5):
        ids = sorted(rng.sample(range(seq * 100, seq * 100 + 100), 30))
        acks.extend((seq, i, 1) for i in ids)
    merged = _merge(acks)
    expanded = [(s, i) for s, first, n in merged for i in range(first, first + n)]
    assert expanded == [(s, i) for s, i, _ in acks]
    assert len(merged) < len(acks)


# -- credit ------------------------------------------------------------------------------


def test_window_before_and_after_measuring() -> None:
    session, _ = make_session(slots=4)
    assert session.window() == 8
    session.job_time_s = 0.001  # 1 ms jobs: 4 slots + PREFETCH_S of 4 slots' work
    assert session.window() == 4 + int(PREFETCH_S * 4 / 0.001)
    session.job_time_s = 10.0  # slow jobs: no prefetch at all
    assert session.window() == 4
    session.job_time_s = 1e-9
    assert session.window() == MAX_WINDOW


def _finish(session: Session, jobs: int, seconds_each: float) -> None:
    session.results.finished += jobs
    session.results.busy_s += jobs * seconds_each
    session._measure()


def test_a_slow_cold_start_does_not_hold_the_window_small() -> None:
    session, _ = make_session()
    _finish(session, 2, 0.001)  # the first two jobs: imports, cold caches
    assert session.window() == 1 + int(PREFETCH_S / 0.001)
    _finish(session, 4096, 1e-7)  # then thousands of fast ones
    assert session.job_time_s < 1e-6
    assert session.window() == MAX_WINDOW


def test_job_time_follows_slower_jobs_over_a_few_acks() -> None:
    session, _ = make_session()
    _finish(session, 3, 0.005)
    assert session.job_time_s == pytest.approx(0.005)
    for _ in range(6):  # the jobs became three times slower
        _finish(session, 3, 0.015)
    assert 0.013 < session.job_time_s < 0.015


def test_thousands_of_fast_jobs_do_not_hide_a_turn_to_slow_ones() -> None:
    session, _ = make_session()
    for _ in range(10):
        _finish(session, 16_384, 1e-7)
    assert session.window() == MAX_WINDOW
    _finish(session, 3, 0.01)  # the jobs now take 10 ms each
    assert session.job_time_s == pytest.approx(0.01)
    assert session.window() == 1 + int(PREFETCH_S / 0.01)  # PREFETCH_S of 10 ms jobs


def _jobs_frame(payloads: list[bytes]) -> bytes:
    return protocol.jobs(1, 0, payloads)


def test_a_window_of_big_fast_jobs_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "MAX_WINDOW_BYTES", 80_000)
    session, _ = make_session(slots=2)
    session.job_time_s = 1e-6  # fast: MAX_WINDOW jobs by time alone
    session.handle(_jobs_frame([b"x" * 1_000] * 10), 0.0)  # 1 kB each
    assert session.window() == 80
    for _ in range(20):  # 1 MB jobs from then on: still one per slot
        session.handle(_jobs_frame([b"x" * 1_000_000]), 0.0)
    assert session.window() == 2
    for _ in range(60):  # tiny jobs again: time decides
        session.handle(_jobs_frame([b"x" * 4] * 10), 0.0)
    assert session.window() == MAX_WINDOW


def test_hello_grants_the_window() -> None:
    session, transport = make_session(slots=2)
    session._send_hello(session.clock())
    [hello] = transport.take(protocol.Hello)
    assert hello.credit == 4 and hello.slots == 2
    assert session.granted == 4


def test_a_session_waiting_for_init_worker_says_hello_but_asks_for_nothing() -> None:
    session, transport = make_session(slots=2)
    session.ready = False
    session.predecessor_died = (11, 7, 3)
    session._send_hello(session.clock())
    [hello] = transport.take(protocol.Hello)
    assert hello.credit == 0 and hello.died is not None and hello.died[1:] == (7, 3)
    welcome(session)
    session._flush(session.clock())
    assert transport.take(protocol.Ack) == []
    session.ready = True  # init_worker returned
    session._flush(session.clock())
    [ack] = transport.take(protocol.Ack)
    assert ack.credit == 4 and session.granted == 4


def test_grant_tops_up_as_jobs_finish() -> None:
    session, transport = make_session(slots=1)
    session._send_hello(session.clock())
    welcome(session)
    session.handle(jobs_frame(1, 0, 2), session.clock())
    assert session._grant() == 0, "everything granted is held"
    session.results.finished = 1
    assert session._grant() == 1
    assert session._grant() == 0, "granted once"
    session.results.finished = 2
    assert session._grant() == 1


def test_grant_waits_for_a_worthwhile_amount_with_a_big_window() -> None:
    session, _ = make_session(slots=1)
    session.job_time_s = 0.0001  # window 1 + 100
    window = session.window()
    session.granted = window
    session.received = window
    session.results.finished = 1
    assert session._grant() == 0, "one job of credit is not worth a message yet"
    session.results.finished = window // 2
    assert session._grant() == window // 2


def test_a_starved_worker_always_asks() -> None:
    session, _ = make_session(slots=2)
    session.job_time_s = 0.0001
    session.granted = session.received = session.results.finished = 1000
    assert session._grant() == session.window()


def test_credit_accounting_over_a_random_conversation() -> None:
    """granted - finished is exactly what the worker holds plus the master's unused credit,
    never more than the window, and a worker holding nothing always has credit out."""
    rng = random.Random(11)
    session, transport = make_session(slots=3)
    clock = session.clock
    session._send_hello(clock())
    [hello] = transport.take(protocol.Hello)
    welcome(session)
    master_credit = hello.credit
    peak_window = session.window()
    seq = 0
    next_id = 0
    for _ in range(3000):
        if master_credit and rng.random() < 0.5:
            n = rng.randint(1, master_credit)
            seq += 1
            session.handle(jobs_frame(seq, next_id, n), clock())
            next_id += n
            master_credit -= n
        if rng.random() < 0.5:
            started = session.queue.get(0)  # the executor takes a batch and runs it
            if started is not None:
                done = len(started.payloads)
                session.results.finished += done
                session.results.busy_s += done * rng.choice([0.0001, 0.001, 0.01])
        if rng.random() < 0.02:
            session.dropped += session.queue.drop_unstarted()
        session._flush(clock())
        peak_window = max(peak_window, session.window())
        for ack in transport.take(protocol.Ack):
            master_credit += ack.credit
        held = session.received - session._finished()
        assert session.granted - session._finished() == held + master_credit
        assert held + master_credit <= peak_window
        if held == 0:
            assert master_credit > 0, "a worker with nothing to do must have credit out"


# -- messages ----------------------------------------------------------------------------


def test_welcome_applies_the_config() -> None:
    session, _ = make_session()
    welcome(session, 42, {"heartbeat_s": 0.2, "liveness_s": 1.5, "timeout_s": 9})
    assert session.welcomed and session.epoch == 42
    assert (session.heartbeat_s, session.liveness_s, session.timeout_s) == (0.2, 1.5, 9.0)


def test_welcome_of_another_version_gives_up() -> None:
    session, _ = make_session()
    session.handle(protocol.pack([protocol.WELCOME, 99, 1, CONFIG]), session.clock())
    assert session.exit_status == EXIT_GAVE_UP and "protocol 99" in session.exit_message


def test_jobs_are_queued() -> None:
    session, _ = make_session()
    welcome(session)
    session.handle(jobs_frame(3, 10, 2), session.clock())
    session.handle(protocol.jobs(4, [20, 25], [b"a", b"b"]), session.clock())
    assert session.received == 4
    first, second = session.queue.get(0), session.queue.get(0)
    assert (first.seq, first.ids, len(first.payloads)) == (3, 10, 2)
    assert (second.seq, second.ids) == (4, [20, 25])


@pytest.mark.parametrize(
    "frame",
    [protocol.PAUSE_FRAME, protocol.REHELLO_FRAME, protocol.ping(8)],
    ids=["pause", "rehello", "ping-of-a-new-master"],
)
def test_losing_the_master_drops_queued_jobs_and_says_hello(frame: bytes) -> None:
    session, transport = make_session(slots=1)
    session._send_hello(session.clock())
    welcome(session, epoch=7)
    session.handle(jobs_frame(1, 0, 2), session.clock())
    transport.take()
    session.clock.now += HELLO_RETRY_S  # type: ignore[attr-defined]  # past the HELLO rate limit
    session.handle(frame, session.clock())
    assert not session.welcomed
    assert session.dropped == 2 and session.queue.get(0) is None
    [hello] = transport.take(protocol.Hello)
    assert hello.credit == session.window(), "the dropped jobs are no longer held"


@pytest.mark.parametrize(
    "frame", [protocol.REHELLO_FRAME, protocol.PAUSE_FRAME], ids=["rehello", "pause"]
)
def test_repeated_rehello_or_pause_gives_one_hello(frame: bytes) -> None:
    session, transport = make_session()
    session._send_hello(session.clock())
    welcome(session)
    transport.take()
    session.clock.now += HELLO_RETRY_S  # type: ignore[attr-defined]
    for _ in range(3):  # three stale frames answered by the master, or WELCOME+PAUSE rounds
        session.handle(frame, session.clock())
        if frame == protocol.PAUSE_FRAME:
            welcome(session)
    assert len(transport.take(protocol.Hello)) == 1


@contextlib.contextmanager
def master_and_session(tmp_path: Path, jobs: int) -> Iterator[tuple[Any, Any, Session, Any]]:
    """A real Master over ``jobs`` jobs (all buffered) and a Session on the same fake clock,
    each with a fake transport the test carries frames between: (master, its transport,
    session, its transport). The session's identity at the master is ``b"w"``."""
    from taskmaster.feeder import Feeder
    from taskmaster.ledger import Ledger
    from taskmaster.master import Master
    from taskmaster.options import MasterConfig
    from tests.conftest import wait_until
    from tests.unit.test_master import IDENTITY, FakeTransport

    ledger = Ledger.open(tmp_path / "s.db", IDENTITY)
    feeder = Feeder(lambda: iter(range(jobs)), size=max(100, 2 * jobs))
    feeder.start()
    try:
        wait_until(lambda: feeder.exhausted)
        clock = FakeClock()
        master_side = FakeTransport()
        master = Master(master_side, feeder, ledger, MasterConfig(), clock=clock)
        session, worker_side = make_session()
        session.clock = clock
        yield master, master_side, session, worker_side
    finally:
        feeder.stop()
        feeder.join(timeout=5)
        ledger.close()


def test_a_master_restart_delivers_each_job_once(tmp_path: Path) -> None:
    with master_and_session(tmp_path, 20) as (master, master_side, session, worker_side):
        clock = session.clock
        welcome(session, epoch=1)  # welcomed by the master that is gone
        session._flush(clock())
        worker_side.raw.clear()
        for frame in (
            protocol.heartbeat(-1, 0.0, 0),
            protocol.ack(0, [(77, 100, 1)], []),
            protocol.heartbeat(-1, 0.0, 0),
        ):
            worker_side.raw.append(frame)  # stale frames on their way to the new master
        deliveries: dict[int, int] = {}
        for _ in range(10):
            if worker_side.raw:  # the network delivers one frame per master step
                master_side.inbox.append((b"w", worker_side.raw.pop(0)))
            master.step(clock())
            for _, message in master_side.sent:
                if message[0] == protocol.JOBS:
                    for job_id in protocol.decode_jobs(message)[1]:
                        deliveries[job_id] = deliveries.get(job_id, 0) + 1
                session.handle(protocol.pack(message), clock())
            master_side.sent.clear()
            clock.now += 0.01  # type: ignore[attr-defined]
        assert deliveries and set(deliveries.values()) == {1}, deliveries


def test_jobs_on_their_way_at_a_give_back_leave_both_sides_in_step(tmp_path: Path) -> None:
    with master_and_session(tmp_path, 100) as (master, master_side, session, worker_side):
        clock = session.clock
        in_flight: list[bytes] = []  # master → worker frames not delivered yet

        def to_master() -> None:
            for frame in worker_side.raw:
                master_side.inbox.append((b"w", frame))
            worker_side.raw.clear()
            master.step(clock())
            in_flight.extend(protocol.pack(message) for _, message in master_side.sent)
            master_side.sent.clear()

        def to_worker() -> None:
            for frame in in_flight:
                session.handle(frame, clock())
            in_flight.clear()

        def in_step() -> bool:
            """What the worker counts on = the master's credit + the jobs on their way."""
            on_their_way = 0
            for frame in in_flight:
                message = protocol.unpack_from_master(frame)
                if message[0] == protocol.JOBS:
                    on_their_way += len(protocol.decode_jobs(message)[1])
            owed = master.workers[b"w"].credit + on_their_way
            return session.granted - session.received == owed

        session._send_hello(clock())
        to_master()
        to_worker()  # WELCOME and the first jobs, 0 and 1
        session.job_time_s = 0.001  # fast jobs: a wide window
        session._flush(clock())
        to_master()  # the rest goes out, and stays on its way
        assert len(in_flight) == 1 and session.received == 2 and in_step()
        seq = session.queue._batches[0].seq
        running_long(session, job_id=0, seq=seq, offset=1)
        heartbeat_after(session, 0.0)
        heartbeat_after(session, 2 * GIVE_BACK_AFTER_S)
        [given] = worker_side.take(protocol.GiveBack)
        assert given.returned == [(seq, 1, 1)] and given.voided > 0
        to_master()  # the master reads the give-back only after it sent the rest
        to_worker()
        assert in_step()
        assert session.granted - session.received < 0, "below 0 by the jobs given back since"
        heartbeat_after(session, 2 * GIVE_BACK_AFTER_S)  # those are given back in turn
        to_master()
        to_worker()
        assert in_step()
        session.results.ok.append((seq, 0, 1))  # the long job ends: it asks again
        session.results.finished = 1
        session.results.busy_s = 3.0
        session._flush(clock())
        to_master()
        assert in_step() and in_flight, "jobs come again"
        to_worker()
        assert in_step()
        assert session.received - session._finished() <= session.window(), "within its window"


def test_ping_of_the_same_master_is_just_a_sign_of_life() -> None:
    session, transport = make_session()
    welcome(session, epoch=7)
    session.clock.now += 2  # type: ignore[attr-defined]
    session.handle(protocol.ping(7), session.clock())
    assert session.welcomed and transport.take() == []
    assert session._last_from_master == session.clock()


def test_end_finishes_with_0() -> None:
    session, _ = make_session()
    welcome(session)
    session.handle(protocol.END_FRAME, session.clock())
    assert session.exit_status == EXIT_OK


def test_refuse_gives_up_with_the_reason() -> None:
    session, _ = make_session()
    session.handle(protocol.refuse("go away"), session.clock())
    assert session.exit_status == EXIT_GAVE_UP and "go away" in session.exit_message


def test_probe_brings_the_heartbeat_forward() -> None:
    session, transport = make_session()
    welcome(session)
    session._next_heartbeat = session.clock() + 10
    session.handle(protocol.PROBE_FRAME, session.clock())
    session._tick(session.clock())
    assert len(transport.take(protocol.Heartbeat)) == 1


def test_the_io_thread_sleeps_until_the_heartbeat_unless_jobs_have_a_timeout() -> None:
    # Each wake-up takes the GIL from a running job: without --timeout only traffic (which
    # wakes the poll by itself) and heartbeats need this thread.
    session, _ = make_session()
    welcome(session)
    session._tick(session.clock())
    assert session._poll_timeout(session.clock()) == pytest.approx(0.5)
    session.clock.now += 0.2  # type: ignore[attr-defined]
    assert session._poll_timeout(session.clock()) == pytest.approx(0.3)
    welcome(session, config={**CONFIG, "timeout_s": 2.0})
    assert session._poll_timeout(session.clock()) == worker_module.TIMEOUT_CHECK_S < 0.3


@pytest.mark.parametrize("frame", [b"", b"\xc1", protocol.pack({"a": 1}), protocol.pack([])])
def test_malformed_master_frames_are_ignored(frame: bytes) -> None:
    session, transport = make_session()
    session.handle(frame, session.clock())
    assert session.exit_status is None and transport.take() == []


def holding_jobs(slots: int, n: int) -> tuple[Session, FakeWorkerTransport]:
    """A welcomed session that received one batch (seq 5) of jobs 0 … n-1."""
    session, transport = make_session(slots=slots)
    session._send_hello(session.clock())
    welcome(session)
    session.handle(jobs_frame(5, 0, n), session.clock())
    transport.take()
    return session, transport


def running_long(session: Session, job_id: int, seq: int, offset: int) -> None:
    """The serial executor took batch ``seq`` from the queue and runs ``job_id`` in it, in a
    block that ends at ``offset``."""
    taken = session.queue.get(0)
    assert taken is not None and taken.seq == seq
    session.queue.start(taken)
    assert session.queue.claim(offset) == offset
    session.results.black_box[0], session.results.black_box[1] = job_id, seq


def heartbeat_after(session: Session, seconds: float) -> None:
    session.clock.now += seconds  # type: ignore[attr-defined]
    session._last_from_master = session.clock()  # the master's PINGs came meanwhile
    session._next_heartbeat = 0.0
    session._tick(session.clock())


def test_jobs_queued_behind_a_long_job_are_given_back() -> None:
    session, transport = holding_jobs(slots=1, n=10)
    session.handle(jobs_frame(6, 10, 5), session.clock())
    session.granted = session.received + 7  # granted before, 7 of it not used by the master
    session.job_time_s = 0.001  # measured on earlier jobs
    running_long(session, job_id=1, seq=5, offset=2)
    heartbeat_after(session, 0.0)
    heartbeat_after(session, GIVE_BACK_AFTER_S * 0.9)
    assert transport.take(protocol.GiveBack) == [], "not long enough yet"
    heartbeat_after(session, GIVE_BACK_AFTER_S * 0.2)
    [given] = transport.take(protocol.GiveBack)
    assert given.returned == [(5, 2, 8), (6, 10, 5)], "the rest of its batch, and the queue"
    assert given.voided == 7, "the credit the master had not used is void"
    assert session.queue.queued_jobs == 0
    assert session.queue.claim(10) == 2, "the executor goes no further than it had claimed"
    assert session.window() == 1, "no more jobs while every slot is stuck"
    assert session.granted == session.received, "on this side too"
    session._flush(session.clock())
    assert all(ack.credit == 0 for ack in transport.take(protocol.Ack))
    heartbeat_after(session, 5.0)
    assert transport.take(protocol.GiveBack) == [], "nothing left to give back"
    session.results.ok.append((5, 0, 2))  # job 1 ends (with job 0 before it)
    session.results.black_box[0] = -1
    session.results.finished = 2
    session.results.busy_s = 0.002
    session._flush(session.clock())
    [ack] = transport.take(protocol.Ack)
    assert ack.acks == [(5, 0, 2)] and ack.credit == session.window() > 1


def threads_running(session: Session, started: list[float]) -> None:
    """A thread executor took batch 5 and runs its first jobs, started at ``started``."""
    taken = session.queue.get(0)
    assert taken is not None and taken.seq == 5
    session.queue.start(taken)
    for job_id, at in enumerate(started):
        assert session.queue.claim_next()
        session.results.running[job_id] = (at, 5)


def test_slots_held_by_long_jobs_prefetch_nothing_and_their_backlog_goes_back() -> None:
    session, transport = holding_jobs(slots=4, n=1000)
    session.job_time_s = 0.01
    t0 = session.clock()
    threads_running(session, [t0, t0, t0])  # three of four threads hang in jobs 0, 1, 2
    heartbeat_after(session, 0.0)
    assert session.window() == 4 + int(PREFETCH_S * 4 / 0.01), "nothing stuck yet"
    session.clock.now += 1.1 * GIVE_BACK_AFTER_S  # type: ignore[attr-defined]
    assert session.queue.claim_next()
    session.results.running[3] = (session.clock(), 5)  # the fourth thread's job 3, just begun
    heartbeat_after(session, 0.0)
    [given] = transport.take(protocol.GiveBack)
    assert given.returned == [(5, 4, 996)], "one thread would need 10 s for them"
    session.results.running.pop(3)  # job 3 ends: the free thread's window is its own
    session.results.finished = 1
    assert session.window() == 4 + int(PREFETCH_S * 1 / 0.01)
    session.results.running[0] = (session.clock(), 7)  # job 0 ended and runs again: not stuck
    assert session.window() == 4 + int(PREFETCH_S * 2 / 0.01)
    for job_id in (0, 1, 2):
        session.results.running.pop(job_id)  # the long jobs end too: all four prefetch again
    assert session.window() == 4 + int(PREFETCH_S * 4 / 0.01)


def test_one_long_job_among_threads_keeps_the_queue_the_others_get_through() -> None:
    session, transport = holding_jobs(slots=4, n=100)
    session.job_time_s = 0.01
    threads_running(session, [session.clock()])
    session.clock.now += 1.1 * GIVE_BACK_AFTER_S  # type: ignore[attr-defined]
    for job_id in (1, 2, 3):
        assert session.queue.claim_next()
        session.results.running[job_id] = (session.clock(), 5)
    heartbeat_after(session, 0.0)
    assert transport.take(protocol.GiveBack) == [], "three threads run 96 jobs in 0.3 s"
    assert session.window() == 4 + int(PREFETCH_S * 3 / 0.01), "no prefetch for the long one"


def test_no_give_back_while_a_slot_is_free_or_when_nothing_waits() -> None:
    session, transport = holding_jobs(slots=2, n=10)
    taken = session.queue.get(0)
    assert taken is not None
    session.queue.start(taken)
    session.queue.claim(1)
    session.results.running[0] = (session.clock(), 5)  # one of two slots busy
    heartbeat_after(session, 10 * GIVE_BACK_AFTER_S)
    assert transport.take(protocol.GiveBack) == []
    lone, lone_transport = holding_jobs(slots=1, n=1)
    lone.job_time_s = 0.001
    running_long(lone, job_id=0, seq=5, offset=1)
    heartbeat_after(lone, 0.0)
    heartbeat_after(lone, 10 * GIVE_BACK_AFTER_S)
    assert lone_transport.take(protocol.GiveBack) == [], "its only job is the long one"
    first, first_transport = holding_jobs(slots=1, n=2)
    running_long(first, job_id=0, seq=5, offset=1)
    heartbeat_after(first, 0.0)
    heartbeat_after(first, 10 * GIVE_BACK_AFTER_S)
    assert first_transport.take(protocol.GiveBack) == [], "no job measured yet: no yardstick"


def test_flush_sends_merged_acks_failures_and_credit() -> None:
    session, transport = holding_jobs(slots=2, n=4)
    results = session.results
    results.ok.extend([(5, 0, 1), (5, 1, 1), (5, 3, 1)])
    results.failed.append((5, 2, "ValueError", "boom", "tb"))
    results.finished = 4
    results.busy_s = 4.0  # 1 s jobs: the window is the slots alone
    session._flush(session.clock())
    [ack] = transport.take(protocol.Ack)
    assert ack.acks == [(5, 0, 2), (5, 3, 1)]
    assert ack.failures == [(5, 2, "ValueError", "boom", "tb")]
    assert ack.credit == session.window()
    session._flush(session.clock())
    assert transport.take() == [], "nothing new: no message"


def test_an_ack_asks_for_a_long_window_and_says_what_a_round_trip_needs() -> None:
    session, transport = holding_jobs(slots=2, n=4)
    session.results.ok.append((5, 0, 4))
    session.results.finished = 4
    session.results.busy_s = 0.02  # 4 jobs of 5 ms
    session._flush(session.clock())
    [ack] = transport.take(protocol.Ack)
    assert session.window() == 2 + int(PREFETCH_S * 2 / 0.005)
    assert ack.end_window == 2 + int(ROUND_TRIP_S * 2 / 0.005) < session.window()


def test_results_without_a_master_wait_for_a_master_of_the_same_run() -> None:
    session, transport = make_session()
    session.results.ok.append((5, 0, 1))
    session.results.finished = 1
    session._flush(session.clock())
    assert transport.take(protocol.Ack) == [], "nobody to tell yet"
    welcome(session, config={**CONFIG, "run": ""})
    [ack] = transport.take(protocol.Ack)
    assert ack.acks == [(5, 0, 1)] and ack.credit == 0


def test_results_of_another_run_are_dropped() -> None:
    session, transport = make_session()
    welcome(session, config={**CONFIG, "run": "2026-01-01T00:00:00"})
    session.handle(protocol.PAUSE_FRAME, session.clock())
    session.results.ok.append((5, 0, 1))
    session.results.finished = 1
    session._flush(session.clock())
    welcome(session, config={**CONFIG, "run": "2026-02-02T00:00:00"})  # after a --reset
    assert all(not ack.acks for ack in transport.take(protocol.Ack))


def test_silence_from_the_master_means_hello_again_then_give_up() -> None:
    session, transport = make_session(wait_s=10.0)
    clock: FakeClock = session.clock  # type: ignore[assignment]
    welcome(session)
    clock.now += 3.5  # past liveness 3.0
    session._tick(clock.now)
    assert not session.welcomed
    assert len(transport.take(protocol.Hello)) == 1
    clock.now += 1.5
    session._tick(clock.now)
    assert len(transport.take(protocol.Hello)) == 1, "HELLO again every second or so"
    clock.now += 9.0
    session._tick(clock.now)
    assert session.exit_status == EXIT_GAVE_UP and "--wait 10s" in session.exit_message


def test_wait_for_a_master_counts_from_the_end_of_init_worker() -> None:
    session, _ = make_session(wait_s=10.0)
    clock: FakeClock = session.clock  # type: ignore[assignment]
    session.ready = False  # a replacement running init_worker, no master yet
    session._send_hello(clock.now)
    for _ in range(30):  # 15 s of init_worker: more than --wait
        clock.now += 0.5
        session._tick(clock.now)
    assert session.exit_status is None
    session.ready = True
    clock.now += 9.0
    session._tick(clock.now)
    assert session.exit_status is None
    clock.now += 1.5
    session._tick(clock.now)
    assert session.exit_status == EXIT_GAVE_UP


def test_a_session_without_a_master_wakes_to_say_hello_again() -> None:
    session, _ = make_session()
    clock: FakeClock = session.clock  # type: ignore[assignment]
    session._send_hello(clock.now)
    session._next_heartbeat = clock.now + 5.0
    assert session._poll_timeout(clock.now) == pytest.approx(HELLO_RETRY_S)
    welcome(session)
    assert session._poll_timeout(clock.now) == pytest.approx(5.0)


def test_a_reset_connection_starts_a_fresh_session_at_once() -> None:
    session, transport = holding_jobs(slots=1, n=10)
    session._check_reset(session.clock())
    assert session.welcomed and transport.take(protocol.Hello) == [], "no reset: nothing"
    started = session.queue.get(0)
    assert started is not None
    session.queue.start(started)
    session.queue.claim(1)  # job 0 runs; jobs 1-9 may have been lost with their master
    transport.resets += 1
    session._check_reset(session.clock())  # well within HELLO_RETRY_S of the first HELLO
    assert not session.welcomed
    [hello] = transport.take(protocol.Hello)
    assert session.dropped == 9 and hello.credit == session.window() - 1, "job 0 still held"
    welcome(session)
    session._check_reset(session.clock())
    assert transport.take(protocol.Hello) == [], "the new session is on the new connection"


def test_a_reset_read_with_the_welcome_still_starts_a_fresh_session() -> None:
    # The connection died after carrying the WELCOME: JOBS sent after it may be lost.
    session, transport = make_session()
    session._send_hello(session.clock())
    transport.resets += 1  # read from the monitor in the same poll as the WELCOME
    welcome(session)
    session._check_reset(session.clock())
    assert not session.welcomed and len(transport.take(protocol.Hello)) == 2


def test_no_fresh_session_after_the_run_is_over() -> None:
    session, transport = make_session()
    session._send_hello(session.clock())
    welcome(session)
    session.handle(protocol.END_FRAME, session.clock())
    transport.resets += 1  # the master closed its socket after END
    session._check_reset(session.clock())
    assert session.welcomed and len(transport.take(protocol.Hello)) == 1


def test_every_ack_fits_the_masters_frame_limit() -> None:
    session, transport = make_session(slots=8)
    session._send_hello(session.clock())
    welcome(session)
    traceback = "x" * executor_module.MAX_TRACEBACK_CHARS
    for job_id in range(1000):
        session.results.failed.append((1, job_id, "OperationalError", "db down", traceback))
    session.results.finished = 1000
    transport.send = lambda frame: transport.raw.append(frame)  # type: ignore[method-assign]
    session._flush(session.clock())
    assert transport.raw
    reported = 0
    for frame in transport.raw:
        message = protocol.decode_from_worker(frame)  # raises ProtocolError if too large
        if isinstance(message, protocol.Ack):
            reported += len(message.failures)
    assert reported == 1000


def test_session_thread_says_hello_queues_jobs_and_ends() -> None:
    transport = FakeWorkerTransport()
    queue = JobQueue()
    transport.inbox = [protocol.welcome(3, CONFIG), jobs_frame(1, 0, 3), protocol.END_FRAME]
    session = Session(transport, queue, Results(lambda: None), -1, slots=1, wait_s=5.0)  # type: ignore[arg-type]
    session.start()
    session.join(timeout=10)
    assert not session.is_alive()
    assert session.exit_status == EXIT_OK
    assert isinstance(transport.sent[0], protocol.Hello)
    assert queue.closed
    batch = queue.get(0)
    assert batch is not None and batch.ids == 0 and len(batch.payloads) == 3


# -- executors ---------------------------------------------------------------------------


def batch(seq: int, ids: int | list[int], jobs: list[Any]) -> Batch:
    return Batch(seq, ids, [pickle.dumps(job) for job in jobs])


def run_executor(executor: Any, *batches: Batch) -> tuple[Results, int]:
    posts = 0

    def post() -> None:
        nonlocal posts
        posts += 1

    queue = JobQueue()
    for b in batches:
        queue.put(b)
    queue.close()
    results = Results(post)
    executor.run(queue, results)
    return results, posts


def expand(ok: Iterator[tuple[int, int, int]] | Any) -> list[tuple[int, int]]:
    return sorted((seq, i) for seq, first, n in ok for i in range(first, first + n))


def test_serial_executor_acks_contiguous_runs() -> None:
    seen: list[Any] = []
    results, posts = run_executor(SerialExecutor(seen.append), batch(1, 0, list("abcde")))
    assert seen == list("abcde")
    assert list(results.ok) == [(1, 0, 5)]
    assert results.finished == 5
    assert not results.failed and not results.running
    assert posts >= 1


def test_serial_executor_failure_splits_the_run() -> None:
    def handle(job: int) -> None:
        if job == 12:
            raise ValueError(f"bad job {job}")

    results, _ = run_executor(SerialExecutor(handle), batch(7, 10, [10, 11, 12, 13, 14]))
    assert list(results.ok) == [(7, 10, 2), (7, 13, 2)]
    [(seq, job_id, error, message, traceback)] = list(results.failed)
    assert (seq, job_id, error, message) == (7, 12, "ValueError", "bad job 12")
    assert "Traceback" in traceback and "bad job 12" in traceback and "handle" in traceback


def test_serial_executor_counts_failures_as_finished() -> None:
    def handle(job: int) -> None:
        raise ValueError(job)

    results, _ = run_executor(SerialExecutor(handle), batch(1, 0, [0, 1, 2]))
    assert len(results.failed) == 3
    assert results.finished == 3


def test_serial_executor_with_explicit_ids() -> None:
    results, _ = run_executor(SerialExecutor(lambda job: None), batch(2, [5, 9, 11], [5, 9, 11]))
    assert expand(results.ok) == [(2, 5), (2, 9), (2, 11)]
    assert results.finished == 3


def test_serial_executor_acks_long_batches_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(range(10**6))
    monkeypatch.setattr(executor_module, "_monotonic", lambda: next(ticks) * 0.1)
    results, posts = run_executor(SerialExecutor(lambda job: None), batch(1, 0, list(range(100))))
    assert len(results.ok) > 1, "acknowledged in several runs, not once at the end"
    assert expand(results.ok) == [(1, i) for i in range(100)]
    assert posts > 1
    assert results.busy_s > 0


def test_serial_executor_runs_batches_in_order() -> None:
    seen: list[int] = []
    run_executor(SerialExecutor(seen.append), batch(1, 0, [0, 1]), batch(2, [7, 3], [7, 3]))
    assert seen == [0, 1, 7, 3]


def test_thread_executor_runs_jobs_concurrently() -> None:
    threads = 3
    barrier = threading.Barrier(threads, timeout=10)
    lock = threading.Lock()
    active = 0
    peak = 0

    def handle(job: int) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        if job < threads:
            barrier.wait()  # the first three can only pass together
        if job == 7:
            with lock:
                active -= 1
            raise KeyError(job)
        with lock:
            active -= 1

    results, _ = run_executor(ThreadExecutor(handle, threads), batch(1, 0, list(range(12))))
    assert peak == threads
    assert expand(results.ok) == [(1, i) for i in range(12) if i != 7]
    assert [(s, j, e) for s, j, e, _, _ in results.failed] == [(1, 7, "KeyError")]
    assert results.finished == 12
    assert not results.running


def test_thread_executor_reports_a_job_that_calls_sys_exit() -> None:
    def handle(job: int) -> None:
        if job == 1:
            raise SystemExit(3)

    results, _ = run_executor(ThreadExecutor(handle, 2), batch(1, 0, [0, 1, 2]))
    assert results.finished == 3
    assert [j for _, j, *_ in results.failed] == [1]


def test_async_executor_runs_up_to_concurrency() -> None:
    concurrency = 4
    active = 0
    peak = 0

    async def handle(job: int) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        for _ in range(3):
            await asyncio.sleep(0)
        active -= 1
        if job % 5 == 0:
            raise RuntimeError(f"job {job}")

    executor = AsyncExecutor(handle, concurrency)
    assert executor_slots(executor) == concurrency
    results, _ = run_executor(executor, batch(1, 0, list(range(10))), batch(2, [20, 21], [20, 21]))
    assert peak == concurrency
    assert expand(results.ok) == [(1, i) for i in range(10) if i % 5] + [(2, 21)]
    assert sorted(j for _, j, *_ in results.failed) == [0, 5, 20]
    assert results.finished == 12
    assert not results.running


def test_an_async_job_that_raises_cancelled_error_fails_and_the_batch_ends() -> None:
    async def handle(job: int) -> None:
        if job == 1:
            inner = asyncio.get_running_loop().create_future()
            inner.cancel()
            await inner  # say, a request another task gave up on
        if job == 2:
            raise asyncio.CancelledError("by hand")

    results, _ = run_executor(AsyncExecutor(handle, 2), batch(1, 0, [0, 1, 2, 3]))
    assert [(j, error) for _, j, error, *_ in results.failed] == [
        (1, "CancelledError"),
        (2, "CancelledError"),
    ]
    assert expand(results.ok) == [(1, 0), (1, 3)]
    assert results.finished == 4 and not results.running


def test_an_async_job_cancelled_by_another_job_fails_and_the_batch_ends() -> None:
    tasks: dict[int, asyncio.Task[Any]] = {}
    started = asyncio.Event()

    async def handle(job: int) -> None:
        if job == 0:
            tasks[0] = asyncio.current_task()  # type: ignore[assignment]
            started.set()
            await asyncio.sleep(10)
        elif job == 1:
            await started.wait()
            tasks[0].cancel()  # say, a job that gives up on a request another one made

    results, _ = run_executor(AsyncExecutor(handle, 2), batch(1, 0, [0, 1, 2]))
    assert [(j, error) for _, j, error, *_ in results.failed] == [(0, "CancelledError")]
    assert expand(results.ok) == [(1, 1), (1, 2)]
    assert results.finished == 3 and not results.running


def test_async_jobs_cancelled_by_a_stopping_loop_are_not_reported() -> None:
    waiting = threading.Event()

    async def handle(job: int) -> None:
        if job == 0:
            await asyncio.get_running_loop().run_in_executor(None, waiting.wait, 10)
            raise KeyboardInterrupt  # Ctrl-C, while job 1 is still running
        await asyncio.sleep(0)
        waiting.set()
        await asyncio.sleep(10)

    queue = JobQueue()
    queue.put(batch(1, 0, [0, 1]))
    queue.close()
    results = Results(lambda: None)
    with pytest.raises(KeyboardInterrupt):
        AsyncExecutor(handle, 2).run(queue, results)
    assert results.finished == 0 and not results.ok and not results.failed


def _give_back_while_blocked(kind: str, jobs: int, blocked: int) -> tuple[Results, list[int]]:
    """Run ``jobs`` jobs on a ``kind`` executor (3 slots where it has several) whose first
    ``blocked`` jobs wait until the jobs not started were taken back; return the results
    and the offsets where batches were taken."""
    queue = JobQueue()
    queue.put(batch(1, 0, list(range(jobs))))
    queue.put(batch(2, 100, [100, 101]))
    queue.close()
    results = Results(lambda: None)
    started = threading.Semaphore(0)
    release = threading.Event()

    def block(job: int) -> None:
        if job < blocked:
            started.release()
            assert release.wait(10)

    async def block_async(job: int) -> None:
        if job < blocked:
            started.release()
            assert await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)

    executor: Any
    if kind == "serial":
        executor = SerialExecutor(block)
    elif kind == "threads":
        executor = ThreadExecutor(block, 3)
    else:
        executor = AsyncExecutor(block_async, 3)
    runner = threading.Thread(target=executor.run, args=(queue, results), daemon=True)
    runner.start()
    for _ in range(blocked):
        assert started.acquire(timeout=10)
    taken = queue.take_back()
    release.set()
    runner.join(10)
    assert not runner.is_alive()
    return results, [offset for _, offset in taken]


def test_serial_executor_stops_where_the_rest_was_taken_back() -> None:
    results, offsets = _give_back_while_blocked("serial", 100, 1)
    cut = offsets[0]
    assert cut == 1, "a slow job (the first is taken for one) claims nothing beyond itself"
    assert offsets == [cut, 0], "the rest of batch 1, and all of batch 2"
    assert expand(results.ok) == [(1, i) for i in range(cut)]


@pytest.mark.parametrize("kind", ["threads", "async"])
def test_concurrent_executors_start_nothing_taken_back(kind: str) -> None:
    results, offsets = _give_back_while_blocked(kind, 10, 3)
    assert offsets == [3, 0]
    assert expand(results.ok) == [(1, 0), (1, 1), (1, 2)]


@pytest.mark.parametrize("kind", ["serial", "threads"])
def test_a_job_is_either_run_or_given_back_never_both(kind: str) -> None:
    # take_back() from inside a job, at a different job each round: for the serial executor
    # that is the moment the I/O thread acts; with threads, the others go on claiming.
    rng = random.Random(7)
    jobs = 20_000
    for _ in range(20):
        queue = JobQueue()
        at = rng.randrange(jobs - 1000)  # leaves more than one claim to give back
        ran: list[int] = []
        taken: list[tuple[Batch, int]] = []

        def handle(
            job: int,
            queue: JobQueue = queue,
            at: int = at,
            ran: list[int] = ran,
            taken: list[tuple[Batch, int]] = taken,
        ) -> None:
            ran.append(job)  # atomic: safe from several threads
            if job == at:
                taken.extend(queue.take_back())

        executor: Any = SerialExecutor(handle) if kind == "serial" else ThreadExecutor(handle, 4)
        queue.put(batch(1, 0, list(range(jobs // 2))))
        queue.put(batch(2, jobs // 2, list(range(jobs // 2, jobs))))
        queue.close()
        executor.run(queue, Results(lambda: None))
        given = [job_id for b, offset in taken for job_id in b.id_seq()[offset:]]
        assert given, "something was still to run"
        assert not set(ran) & set(given), "a job given back also ran"
        assert sorted(ran + given) == list(range(jobs)), "a job neither ran nor was given back"


def test_make_executor_runs_an_async_handle_job_on_the_event_loop() -> None:
    ran: list[int] = []

    async def handle(job: int) -> None:
        await asyncio.sleep(0)
        ran.append(job)

    executor = make_executor(handle, concurrency=3)
    assert isinstance(executor, AsyncExecutor) and executor_slots(executor) == 3
    results, _ = run_executor(executor, batch(1, 0, [0, 1, 2]))
    assert sorted(ran) == [0, 1, 2], "every coroutine was awaited"
    assert results.finished == 3


def test_make_executor_picks_by_kind() -> None:
    def handle(job: Any) -> None:
        pass

    serial = make_executor(handle)
    threaded = make_executor(handle, threads=8)
    assert isinstance(serial, SerialExecutor) and executor_slots(serial) == 1
    assert isinstance(threaded, ThreadExecutor) and executor_slots(threaded) == 8


def test_job_queue_get_times_out_and_close_ends_it() -> None:
    queue = JobQueue()
    assert queue.get(0) is None
    queue.put(Batch(1, 0, [b"x", b"y"]))
    queue.put(Batch(2, 2, [b"z"]))
    assert [(batch.seq, offset) for batch, offset in queue.take_back()] == [(1, 0), (2, 0)]
    assert queue.get(0) is None, "taken back: nothing left to run"
    queue.close()
    assert queue.get() is None and queue.closed
