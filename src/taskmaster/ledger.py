"""The run's durable state: one SQLite file per run, written by the master only.

What it knows, exactly (not "the first job queued"): the watermark W (every job id below W is
resolved: done, or failed and recorded), the ids resolved above W as ranges, the job to pass as
``last`` on resume, counters, failures with their payloads and tracebacks, and the run's
identity. Writes are batched: :meth:`Ledger.checkpoint` commits one transaction.

No zmq, no rich here: this module is tested alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from .errors import LedgerCorrupt, LedgerError
from .state import Checkpoint, CompletedSet, MasterLock, create_private, lock_state, now_iso

__all__ = ["Checkpoint", "CompletedSet", "Failure", "Ledger", "LedgerView", "MasterLock"]

SCHEMA_VERSION = 1

_DDL = (
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS checkpoint (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        watermark INTEGER NOT NULL,
        resume_id INTEGER NOT NULL,
        resume_job BLOB,
        first_job BLOB,
        ranges BLOB NOT NULL,
        exhausted INTEGER NOT NULL,
        generator_error TEXT,
        done INTEGER NOT NULL,
        failed INTEGER NOT NULL,
        duplicates INTEGER NOT NULL,
        retried INTEGER NOT NULL,
        total INTEGER,
        rate REAL NOT NULL,
        in_flight INTEGER NOT NULL,
        workers INTEGER NOT NULL,
        started TEXT,
        updated TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS failures (
        job_id INTEGER PRIMARY KEY,
        job BLOB,
        job_repr TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        error TEXT NOT NULL,
        message TEXT NOT NULL,
        traceback TEXT NOT NULL,
        worker TEXT NOT NULL,
        failed_at TEXT NOT NULL
    )""",
)
_TABLES = {"meta", "checkpoint", "failures"}


class Failure(NamedTuple):
    job_id: int
    job: bytes | None
    job_repr: str
    attempts: int
    error: str
    message: str
    traceback: str
    worker: str
    failed_at: str

    def as_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "job": self.job_repr,
            "attempts": self.attempts,
            "error": self.error,
            "message": self.message,
            "traceback": self.traceback,
            "worker": self.worker,
            "failed_at": self.failed_at,
        }


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    try:
        if readonly:
            uri = f"file:{path}?mode=ro"
            return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5)
        # Not tied to its thread: a fresh run's file is created on one (state.FreshLedger)
        # and used on the master's; the master never uses it from two threads at once.
        return sqlite3.connect(path, isolation_level=None, timeout=5, check_same_thread=False)
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: cannot open the state file ({exc})") from exc


def _check_schema(conn: sqlite3.Connection, path: Path) -> bool:
    """Return whether the file already holds a taskmaster state; raise if it is unusable."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise LedgerCorrupt(f"{path}: not a readable taskmaster state file ({exc})") from exc
    if version > SCHEMA_VERSION:
        raise LedgerCorrupt(
            f"{path}: written by a newer taskmaster (schema {version}, this one reads "
            f"{SCHEMA_VERSION}); upgrade taskmaster"
        )
    if not tables:
        return False
    if version != SCHEMA_VERSION or not tables >= _TABLES:
        raise LedgerCorrupt(f"{path}: not a taskmaster state file (unexpected schema)")
    try:
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise LedgerCorrupt(f"{path}: corrupt state file ({exc})") from exc
    if result != "ok":
        raise LedgerCorrupt(f"{path}: corrupt state file ({result})")
    return True


def _row_to_checkpoint(row: sqlite3.Row | tuple[Any, ...] | None, path: Path) -> Checkpoint:
    if row is None:
        return Checkpoint(ranges=[])
    (wm, rid, rjob, fjob, ranges, exhausted, gerr, done, failed, dup, retried, total, rate,
     in_flight, workers, started, updated) = row  # fmt: skip
    try:
        pairs = [(int(s), int(e)) for s, e in msgpack.unpackb(ranges)]
        if not isinstance(wm, int) or not isinstance(rid, int) or any(s >= e for s, e in pairs):
            raise ValueError("watermark or ranges out of shape")
    except (ValueError, TypeError) as exc:  # msgpack's errors are ValueErrors
        raise LedgerCorrupt(f"{path}: corrupt checkpoint in the state file ({exc})") from exc
    return Checkpoint(
        watermark=wm,
        resume_id=rid,
        resume_job=rjob,
        first_job=fjob,
        ranges=pairs,
        exhausted=bool(exhausted),
        generator_error=gerr,
        done=done,
        failed=failed,
        duplicates=dup,
        retried=retried,
        total=total,
        rate=rate,
        in_flight=in_flight,
        workers=workers,
        started=started,
        updated=updated,
    )


_SELECT_CHECKPOINT = """SELECT watermark, resume_id, resume_job, first_job, ranges, exhausted,
    generator_error, done, failed, duplicates, retried, total, rate, in_flight, workers,
    started, updated FROM checkpoint WHERE id = 1"""


def _read_checkpoint(conn: sqlite3.Connection, path: Path) -> Checkpoint:
    try:
        row = conn.execute(_SELECT_CHECKPOINT).fetchone()
    except sqlite3.DatabaseError as exc:
        raise LedgerCorrupt(f"{path}: corrupt state file ({exc})") from exc
    return _row_to_checkpoint(row, path)


class Ledger:
    """The master's read-write handle on a state file (holds the one-master lock)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock: MasterLock, fresh: bool):
        self.path = path
        self._conn = conn
        self._lock = lock
        self.fresh = fresh
        # When this state was created: names the run, so results from a run that was
        # --reset since are not counted in the new one.
        row = conn.execute("SELECT value FROM meta WHERE key = 'created'").fetchone()
        self.run_id = str(json.loads(row[0])) if row else ""
        self.checkpoint_row = _read_checkpoint(conn, path)
        row = self.checkpoint_row
        self.completed = CompletedSet(row.watermark, row.ranges or [])
        self._pending_failures: list[tuple[Any, ...]] = []
        self._pending_cleared: list[int] = []
        # With ``reset``: the checkpoint of the run that was thrown away, for the log.
        self.discarded: Checkpoint | None = None

    @classmethod
    def open(cls, path: Path, identity: dict[str, Any], *, reset: bool = False) -> Ledger:
        """Open (or create, mode 0600) the state at ``path`` for a master, taking the lock.

        ``reset`` discards a previous run's state (what it held is in :attr:`discarded`). A
        file that is not a taskmaster state, is corrupt, or comes from a newer version raises
        :class:`LedgerCorrupt` and is left as it was: never a fresh start, not even with
        ``reset``, which only ever deletes a readable taskmaster state.
        """
        lock = lock_state(path)
        conn: sqlite3.Connection | None = None
        try:
            if not path.exists():
                create_private(path)
            conn = _connect(path, readonly=False)
            # Every check reads only: a file we refuse is left byte for byte as it was.
            exists = _check_schema(conn, path)
            discarded: Checkpoint | None = None
            if exists:
                previous = _read_checkpoint(conn, path)
                if reset:
                    discarded = previous
                    conn.close()
                    conn = None
                    cls._discard(path)
                    conn = _connect(path, readonly=False)
                    exists = False
                else:
                    cls._check_identity(conn, path, identity)
            cls._prepare(conn)
            if not exists:
                cls._create(conn, identity, now_iso())
            cls._private(path)
            ledger = cls(path, conn, lock, fresh=not exists)
        except BaseException as exc:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            lock.release()
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise LedgerError(f"{path}: cannot use the state file ({exc})") from exc
            raise
        ledger.discarded = discarded
        return ledger

    @classmethod
    def create(
        cls, path: Path, identity: dict[str, Any], lock: MasterLock, *, created: str
    ) -> Ledger:
        """A new run's state in the empty file at ``path``, whose ``lock`` the caller holds.

        On failure the file holds no tables (a later open starts it afresh) and the lock stays
        with the caller.
        """
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(path, readonly=False)
            cls._prepare(conn)
            cls._create(conn, identity, created)
            cls._private(path)
            return cls(path, conn, lock, fresh=True)
        except BaseException as exc:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise LedgerError(f"{path}: cannot use the state file ({exc})") from exc
            raise

    @staticmethod
    def _prepare(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL survives any process crash; a power cut can only lose the last
        # checkpoints, which costs re-runs, never a job.
        conn.execute("PRAGMA synchronous=NORMAL")

    @staticmethod
    def _private(path: Path) -> None:
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{path}{suffix}", 0o600)

    @staticmethod
    def _discard(path: Path) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")
        create_private(path)

    @staticmethod
    def _create(conn: sqlite3.Connection, identity: dict[str, Any], created: str) -> None:
        conn.execute("BEGIN IMMEDIATE")
        for ddl in _DDL:
            conn.execute(ddl)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in identity.items()] + [("created", json.dumps(created))],
        )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")

    @staticmethod
    def _check_identity(conn: sqlite3.Connection, path: Path, identity: dict[str, Any]) -> None:
        stored = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        if stored.get("kwargs", identity.get("kwargs")) != identity.get("kwargs"):
            raise LedgerError(
                f"{path} belongs to a run with other arguments ({stored.get('kwargs')}); "
                "use another --state or --reset"
            )
        # Two tasks files with one name (a/tasks.py, b/tasks.py) share a default state name:
        # never resume one run as the other.
        source, stored_source = identity.get("source"), stored.get("source")
        if source and stored_source and source != stored_source:
            raise LedgerError(
                f"{path} belongs to the run of {stored_source}, not {source}; "
                "use --state PATH for a separate run, or --reset"
            )

    # -- the master's updates (in memory until checkpoint) -------------------------------

    def record_failure(
        self,
        job_id: int,
        job: bytes | None,
        job_repr: str,
        attempts: int,
        error: str,
        message: str,
        traceback: str,
        worker: str,
    ) -> None:
        """Queue a failure row for the next checkpoint (the caller resolves the id)."""
        self._pending_failures.append(
            (job_id, job, job_repr, attempts, error, message, traceback, worker, now_iso())
        )

    def clear_failure(self, job_id: int) -> None:
        """A recorded failure that later succeeded (``--retry-failed``)."""
        self._pending_cleared.append(job_id)

    def checkpoint(self, state: Checkpoint) -> None:
        """Commit everything known now in one transaction."""
        state.watermark = self.completed.watermark
        state.ranges = self.completed.ranges()
        state.updated = now_iso()
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            if self._pending_failures:
                conn.executemany(
                    "INSERT OR REPLACE INTO failures VALUES (?,?,?,?,?,?,?,?,?)",
                    self._pending_failures,
                )
            if self._pending_cleared:
                conn.executemany(
                    "DELETE FROM failures WHERE job_id = ?", [(j,) for j in self._pending_cleared]
                )
            conn.execute(
                "INSERT OR REPLACE INTO checkpoint VALUES (1,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    state.watermark,
                    state.resume_id,
                    state.resume_job,
                    state.first_job,
                    msgpack.packb(state.ranges),
                    int(state.exhausted),
                    state.generator_error,
                    state.done,
                    state.failed,
                    state.duplicates,
                    state.retried,
                    state.total,
                    state.rate,
                    state.in_flight,
                    state.workers,
                    state.started,
                    state.updated,
                ),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise LedgerError(f"{self.path}: checkpoint failed: {exc}") from exc
        self._pending_failures.clear()
        self._pending_cleared.clear()
        self.checkpoint_row = state

    def failures(self) -> list[Failure]:
        return list(_read_failures(self._conn))

    def prepare(self) -> None:
        """Nothing to do: an open ledger is ready (see :meth:`FreshLedger.prepare`)."""

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        self._lock.release()


def _read_failures(conn: sqlite3.Connection) -> Iterator[Failure]:
    for row in conn.execute(
        "SELECT job_id, job, job_repr, attempts, error, message, traceback, worker, failed_at "
        "FROM failures ORDER BY job_id"
    ):
        yield Failure(*row)


class LedgerView:
    """A read-only look at a state file, safe while a master writes it (``tm status``)."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise LedgerError(f"{path}: no state file (has this run started?)")
        self.path = path
        self._conn = _connect(path, readonly=True)
        try:
            if not _check_schema(self._conn, path):
                raise LedgerCorrupt(f"{path}: empty state file")
        except BaseException:
            self._conn.close()
            raise

    def checkpoint(self) -> Checkpoint:
        return _read_checkpoint(self._conn, self.path)

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM meta")}

    def failures(self) -> list[Failure]:
        return list(_read_failures(self._conn))

    def running(self) -> bool:
        return MasterLock.is_held(self.path)

    def close(self) -> None:
        self._conn.close()
