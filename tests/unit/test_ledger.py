"""The ledger alone: the completed set, the SQLite state file, the one-master lock."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskmaster.errors import LedgerCorrupt, LedgerError, LedgerLocked
from taskmaster.ledger import (
    SCHEMA_VERSION,
    Checkpoint,
    CompletedSet,
    Ledger,
    LedgerView,
    MasterLock,
)
from taskmaster.state import FreshLedger

IDENTITY = {"target": "tasks", "kwargs": {"n": "10"}, "protocol": 1}


# -- CompletedSet ---------------------------------------------------------------------------


def test_in_order_completions_only_move_the_watermark() -> None:
    done = CompletedSet()
    assert done.add(0, 10) == 10
    assert done.add(10, 5) == 5
    assert done.watermark == 15
    assert done.ranges() == []


def test_out_of_order_completions_are_kept_as_ranges() -> None:
    done = CompletedSet()
    assert done.add(100, 50) == 50
    assert done.add(10, 5) == 5
    assert done.watermark == 0
    assert done.ranges() == [(10, 15), (100, 150)]
    assert 12 in done and 149 in done
    assert 9 not in done and 15 not in done and 150 not in done
    assert done.highest == 150
    assert done.resolved_above == 55


def test_touching_and_overlapping_ranges_merge() -> None:
    done = CompletedSet()
    done.add(10, 5)  # [10, 15)
    done.add(20, 5)  # [20, 25)
    done.add(15, 5)  # fills the gap exactly
    assert done.ranges() == [(10, 25)]
    assert done.add(5, 30) == 15  # covers it all; 10..24 were already there
    assert done.ranges() == [(5, 35)]


def test_watermark_advances_over_every_range_it_reaches() -> None:
    done = CompletedSet()
    done.add(1, 1)
    done.add(3, 2)
    done.add(6, 100)
    assert done.watermark == 0 and len(done.ranges()) == 3
    done.add(0, 1)
    assert done.watermark == 2 and done.ranges() == [(3, 5), (6, 106)]
    done.add(2, 1)
    assert done.watermark == 5
    done.add(5, 1)
    assert done.watermark == 106 and done.ranges() == []


def test_duplicates_count_as_zero_new() -> None:
    done = CompletedSet()
    assert done.add(0, 10) == 10
    assert done.add(0, 10) == 0  # below the watermark
    assert done.add(5, 1) == 0
    assert done.add(20, 10) == 10
    assert done.add(22, 3) == 0  # inside a range
    assert done.add(25, 10) == 5  # half new
    assert done.add(8, 20) == 10  # 10..19 new, 8..9 and 20..27 not
    assert done.add(40, 0) == 0 and done.add(40, -3) == 0
    assert done.ranges() == [] and done.watermark == 35


def test_random_completions_match_a_plain_set() -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    done = CompletedSet()
    truth: set[int] = set()
    for _ in range(3000):
        start, count = rng.randrange(2000), rng.randrange(1, 20)
        new = set(range(start, start + count)) - truth
        assert done.add(start, count) == len(new), f"seed {seed}"
        truth |= new
    watermark = 0
    while watermark in truth:
        watermark += 1
    assert done.watermark == watermark, f"seed {seed}"
    assert all((i in done) == (i in truth) for i in range(2100)), f"seed {seed}"
    ranges = done.ranges()
    assert all(e1 < s2 for (_, e1), (s2, _) in zip(ranges, ranges[1:], strict=False)), "disjoint"


def test_ranges_stay_few_when_one_job_lags() -> None:
    # One slow job (id 5) while everything after it finishes in batches: one range, not 10^6.
    done = CompletedSet()
    done.add(0, 5)
    for start in range(6, 1_000_006, 1000):
        done.add(start, 1000)
    assert done.watermark == 5 and done.ranges() == [(6, 1_000_006)]
    done.add(5, 1)
    assert done.watermark == 1_000_006 and done.ranges() == []


def test_built_from_stored_ranges() -> None:
    done = CompletedSet(10, [(12, 15), (20, 30)])
    assert done.watermark == 10 and done.ranges() == [(12, 15), (20, 30)]
    assert CompletedSet(10, [(10, 15)]).watermark == 15


# -- the state file ---------------------------------------------------------------------------


def _file_state(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def _reopened(path: Path) -> Iterator[Ledger]:
    """The state at ``path`` opened again, as the next master would, and closed after."""
    ledger = Ledger.open(path, IDENTITY)
    try:
        yield ledger
    finally:
        ledger.close()


def test_created_0600_in_wal_mode_with_the_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    ledger = Ledger.open(path, IDENTITY)
    try:
        assert ledger.fresh
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for suffix in ("-wal", "-shm", ".lock"):
            extra = Path(f"{path}{suffix}")
            if extra.exists():
                assert stat.S_IMODE(extra.stat().st_mode) == 0o600, suffix
        ledger.checkpoint(Checkpoint(done=3))
    finally:
        ledger.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    ledger = Ledger.open(path, IDENTITY)
    ledger.completed.add(0, 100)
    ledger.completed.add(150, 10)
    ledger.record_failure(
        120, pickle.dumps(120), "120", 2, "ValueError", "bad", "Traceback…", "h:1"
    )
    state = Checkpoint(
        resume_id=100, resume_job=pickle.dumps(100), first_job=pickle.dumps(0), done=109,
        failed=1, duplicates=4, retried=2, total=1000, rate=12.5, in_flight=7, workers=2,
        started="then",
    )  # fmt: skip
    ledger.checkpoint(state)
    ledger.close()

    with _reopened(path) as again:
        cp = again.checkpoint_row
        assert not again.fresh
        assert (cp.watermark, cp.ranges) == (100, [(150, 160)])
        assert pickle.loads(cp.resume_job or b"") == 100 and cp.resume_id == 100
        assert pickle.loads(cp.first_job or b"") == 0
        assert (cp.done, cp.failed, cp.duplicates, cp.retried, cp.total) == (109, 1, 4, 2, 1000)
        assert again.completed.watermark == 100 and 155 in again.completed
        assert cp.updated and "T" in cp.updated
        [failure] = again.failures()
        assert (failure.job_id, failure.attempts, failure.error) == (120, 2, "ValueError")
    view = LedgerView(path)
    try:
        assert view.checkpoint().done == 109
        assert view.meta()["kwargs"] == {"n": "10"}
        assert not view.running()
    finally:
        view.close()


def test_nothing_is_written_before_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    ledger = Ledger.open(path, IDENTITY)
    ledger.checkpoint(Checkpoint(done=5))
    ledger.completed.add(0, 50)
    ledger.record_failure(60, None, "60", 1, "E", "m", "", "w")
    view = LedgerView(path)  # a second connection sees only committed state
    try:
        assert view.checkpoint().done == 5 and view.checkpoint().watermark == 0
        assert view.failures() == []
        ledger.checkpoint(Checkpoint(done=50))
        assert view.checkpoint().watermark == 50
        assert [f.job_id for f in view.failures()] == [60]
    finally:
        view.close()
        ledger.close()


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "pages", "bad_ranges"],
)
def test_a_corrupt_file_is_refused_and_left_unchanged(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "state.db"
    ledger = Ledger.open(path, IDENTITY)
    ledger.completed.add(0, 10)
    ledger.checkpoint(Checkpoint(done=10))
    for i in range(300):  # enough rows for several pages
        ledger.record_failure(100 + i, b"x" * 200, "x", 1, "E", "m" * 100, "t" * 200, "w")
    ledger.checkpoint(Checkpoint(done=10))
    ledger.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not a database at all\n" * 100)
    elif damage == "truncated":
        path.write_bytes(data[:100])
    elif damage == "pages":
        page = 4096
        path.write_bytes(data[: 2 * page] + os.urandom(len(data) - 2 * page))
    else:
        conn = sqlite3.connect(path)
        conn.execute("UPDATE checkpoint SET ranges = x'c1c1c1'")
        conn.commit()
        conn.close()
    before = _file_state(path)
    with pytest.raises(LedgerCorrupt) as info:
        Ledger.open(path, IDENTITY)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "corrupt" in message or "not a" in message
    assert _file_state(path) == before
    # --reset does not throw away something it cannot read either.
    with pytest.raises(LedgerCorrupt):
        Ledger.open(path, IDENTITY, reset=True)
    assert _file_state(path) == before
    # And the lock was released: a good file at the same place opens at once.
    path.unlink()
    Ledger.open(path, IDENTITY).close()


def test_a_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    before = _file_state(path)
    with pytest.raises(LedgerCorrupt, match="not a taskmaster state file"):
        Ledger.open(path, IDENTITY)
    assert _file_state(path) == before


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Ledger.open(path, IDENTITY).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = _file_state(path)
    with pytest.raises(LedgerCorrupt, match="newer taskmaster"):
        Ledger.open(path, IDENTITY)
    with pytest.raises(LedgerCorrupt, match="newer taskmaster"):
        LedgerView(path)
    assert _file_state(path) == before


def test_other_kwargs_are_refused_and_reset_discards(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    ledger = Ledger.open(path, IDENTITY)
    ledger.completed.add(0, 7)
    ledger.checkpoint(Checkpoint(done=7, failed=1, exhausted=True))
    ledger.close()
    before = _file_state(path)
    with pytest.raises(LedgerError, match="other arguments"):
        Ledger.open(path, {**IDENTITY, "kwargs": {"n": "11"}})
    assert _file_state(path) == before
    fresh = Ledger.open(path, {**IDENTITY, "kwargs": {"n": "11"}}, reset=True)
    try:
        assert fresh.fresh and fresh.completed.watermark == 0
        assert fresh.discarded is not None
        assert (fresh.discarded.done, fresh.discarded.failed, fresh.discarded.watermark) == (
            7,
            1,
            7,
        )
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        fresh.close()


def test_a_second_open_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    ledger = Ledger.open(path, IDENTITY)
    try:
        before = _file_state(path)
        with pytest.raises(LedgerLocked) as info:
            Ledger.open(path, IDENTITY)
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert str(path) in message and "\n" not in message
        assert _file_state(path) == before
        assert MasterLock.is_held(path)
    finally:
        ledger.close()
    assert not MasterLock.is_held(path)
    Ledger.open(path, IDENTITY).close()


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from taskmaster.ledger import Ledger
    ledger = Ledger.open(Path(sys.argv[1]), {"target": "tasks", "kwargs": {"n": "10"}})
    print("locked", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.timeout(30)
def test_the_lock_dies_with_a_sigkilled_holder(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"locked\n"
        with pytest.raises(LedgerLocked, match=f"pid {child.pid} on "):
            Ledger.open(path, IDENTITY)
        assert MasterLock.is_held(path)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
        ledger = Ledger.open(path, IDENTITY)  # at once: no stale lock to wait out
        try:
            assert not ledger.fresh
        finally:
            ledger.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_status_view_reads_while_a_master_writes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    ledger = Ledger.open(path, IDENTITY)
    try:
        view = LedgerView(path)
        try:
            assert view.running()
            for i in range(1, 20):
                ledger.completed.add(i * 10 - 10, 10)
                ledger.checkpoint(Checkpoint(done=i * 10))
                assert view.checkpoint().watermark == i * 10
        finally:
            view.close()
    finally:
        ledger.close()


def test_status_view_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no state file"):
        LedgerView(tmp_path / "nope.db")


def test_a_checkpoint_is_quick_when_one_job_lags(tmp_path: Path) -> None:
    # The row holds the ranges, not the ids: its size stays small however far the others ran.
    ledger = Ledger.open(tmp_path / "state.db", IDENTITY)
    try:
        ledger.completed.add(0, 5)
        for start in range(6, 2_000_006, 500):
            ledger.completed.add(start, 500)
        started = time.perf_counter()
        ledger.checkpoint(Checkpoint())
        assert time.perf_counter() - started < 1.0
        assert ledger.checkpoint_row.ranges == [(6, 2_000_006)]
    finally:
        ledger.close()


# -- a fresh run's state, created on a thread ----------------------------------------------


def test_a_fresh_state_answers_at_once_and_is_written_like_any_other(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    fresh = FreshLedger.start(path, IDENTITY)
    assert fresh is not None
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # before SQLite touched it
        assert MasterLock.is_held(path)
        assert fresh.fresh and fresh.discarded is None
        assert fresh.checkpoint_row.watermark == 0 and fresh.checkpoint_row.ranges == []
        fresh.completed.add(0, 40)  # the master fills the set in before the first write
        fresh.record_failure(41, pickle.dumps(41), "41", 1, "ValueError", "no", "tb", "h:1")
        fresh.checkpoint(Checkpoint(done=40, failed=1, started="then"))
        assert fresh.checkpoint_row.done == 40
    finally:
        fresh.close()
    assert not MasterLock.is_held(path)
    with _reopened(path) as again:
        assert not again.fresh and again.run_id == fresh.run_id
        assert again.checkpoint_row.watermark == 40 and again.checkpoint_row.done == 40
        [failure] = again.failures()
        assert failure.job_id == 41
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_a_fresh_state_loads_sqlite_only_once_prepared(tmp_path: Path) -> None:
    # Until the master's first jobs are out, nothing may take the GIL from its handshakes:
    # the empty file and the lock are there, the tables are not.
    path = tmp_path / "state.db"
    fresh = FreshLedger.start(path, IDENTITY)
    assert fresh is not None
    try:
        assert not any(t.name == "taskmaster-state" for t in threading.enumerate())
        assert path.stat().st_size == 0 and MasterLock.is_held(path)
        fresh.prepare()
        fresh.prepare()  # once is enough
        fresh.checkpoint(Checkpoint(done=3))
    finally:
        fresh.close()
    with _reopened(path) as again:
        assert again.checkpoint_row.done == 3


def test_a_fresh_state_never_written_is_still_a_whole_state_when_closed(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    fresh = FreshLedger.start(path, IDENTITY)
    assert fresh is not None
    fresh.close()  # say, a master stopped before any worker came
    assert not MasterLock.is_held(path)
    with _reopened(path) as again:
        assert not again.fresh and again.run_id == fresh.run_id


def test_a_fresh_state_is_made_in_place_when_no_thread_can_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    path = tmp_path / "state.db"
    fresh = FreshLedger.start(path, IDENTITY)
    assert fresh is not None
    monkeypatch.setattr(threading.Thread, "start", refuse)
    try:
        fresh.prepare()
        fresh.checkpoint(Checkpoint(done=2))
    finally:
        fresh.close()
    monkeypatch.undo()
    assert not MasterLock.is_held(path)
    with _reopened(path) as again:
        assert again.checkpoint_row.done == 2


def test_an_existing_state_is_not_fresh(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Ledger.open(path, IDENTITY).close()
    before = _file_state(path)
    assert FreshLedger.start(path, IDENTITY) is None
    assert _file_state(path) == before and not MasterLock.is_held(path)


def test_a_locked_state_fails_before_anything_runs(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    holder = MasterLock(path)
    holder.acquire()
    try:
        with pytest.raises(LedgerLocked):
            FreshLedger.start(path, IDENTITY)
        assert not path.exists()
    finally:
        holder.release()


def test_a_state_that_cannot_be_created_fails_at_the_first_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> Ledger:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Ledger, "_prepare", staticmethod(refuse))
    path = tmp_path / "state.db"
    fresh = FreshLedger.start(path, IDENTITY)
    assert fresh is not None
    with pytest.raises(LedgerError, match="disk I/O error"):
        fresh.checkpoint(Checkpoint(done=1))
    fresh.close()
    assert not MasterLock.is_held(path)
