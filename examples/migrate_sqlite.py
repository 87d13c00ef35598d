"""Migrate every row of a SQLite table of 1,000,000 rows, in batches, resumably.

    python examples/migrate_sqlite.py --setup        # users.db: table users, 1,000,000 rows
    tm-run examples/migrate_sqlite.py 2              # users.db → users_v2.db, 1,000 jobs
    python examples/migrate_sqlite.py --check        # every row there, and right?

A job is a range of ids, ``(lo, hi)``: ``batch`` rows (default 1,000) read from ``users`` and
written to ``users_v2`` in one transaction. Stop the run at any point (Ctrl-C, kill -9, a
power cut) and start the same command again: it resumes at ``last``, the first batch not
known to be done, and ``INSERT OR REPLACE`` makes a batch that runs twice harmless.

Each worker process opens its two connections once, in ``init_worker``. The files are
``MIGRATE_SOURCE`` and ``MIGRATE_TARGET`` (default ``users.db`` and ``users_v2.db``), read by
the master and the workers alike. ``shard=K of=N`` runs only every N-th batch from the K-th,
so N masters, each with its own state, can split one migration (see the README).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import closing

Job = tuple[int, int]  # ids lo … hi-1

_source: sqlite3.Connection | None = None
_target: sqlite3.Connection | None = None

TARGET_DDL = """CREATE TABLE IF NOT EXISTS users_v2 (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    domain TEXT NOT NULL,
    created TEXT NOT NULL
)"""


def source_path() -> str:
    return os.environ.get("MIGRATE_SOURCE", "users.db")


def target_path() -> str:
    return os.environ.get("MIGRATE_TARGET", "users_v2.db")


def _id_range() -> tuple[int, int]:
    with closing(sqlite3.connect(f"file:{source_path()}?mode=ro", uri=True)) as db:
        lo, hi = db.execute("SELECT min(id), max(id) FROM users").fetchone()
    return (0, 0) if lo is None else (lo, hi + 1)


def _batches(batch: str, shard: str, of: str, start: int | None) -> Iterator[Job]:
    size, k, n = int(batch), int(shard), int(of)
    if not 0 <= k < n:
        raise ValueError(f"shard={k} of={n}: need 0 <= shard < of")
    first, end = _id_range()
    for lo in range(first if start is None else start, end, size):
        if ((lo - first) // size) % n == k:
            yield (lo, min(lo + size, end))


def count_jobs(batch: str = "1000", shard: str = "0", of: str = "1", **kwargs: str) -> int:
    return sum(1 for _ in _batches(batch, shard, of, None))


def get_jobs(
    batch: str = "1000", shard: str = "0", of: str = "1", last: Job | None = None, **kwargs: str
) -> Iterator[Job]:
    """``(lo, hi)`` id ranges over the whole table; on resume from ``last`` on."""
    yield from _batches(batch, shard, of, last[0] if last else None)


def init_worker() -> None:
    """Once per worker process: a read-only source and a writable target connection."""
    global _source, _target
    _source = sqlite3.connect(f"file:{source_path()}?mode=ro", uri=True)
    _target = sqlite3.connect(target_path(), timeout=60)
    _target.execute("PRAGMA journal_mode=WAL")
    _target.execute("PRAGMA synchronous=NORMAL")
    _target.execute(TARGET_DDL)


def transform(row: tuple[int, str, str, int]) -> tuple[int, str, str, str, str]:
    """The migration itself: trim the name, lower the email, split out its domain, ISO dates."""
    user_id, name, email, created = row
    email = email.strip().lower()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    return (user_id, name.strip(), email, email.rpartition("@")[2], stamp)


def handle_job(job: Job) -> None:
    lo, hi = job
    assert _source is not None and _target is not None, "init_worker() opens the databases"
    rows = _source.execute(
        "SELECT id, name, email, created FROM users WHERE id >= ? AND id < ?", (lo, hi)
    ).fetchall()
    with _target:  # one transaction per batch
        _target.executemany(
            "INSERT OR REPLACE INTO users_v2 VALUES (?, ?, ?, ?, ?)", map(transform, rows)
        )


# -- python examples/migrate_sqlite.py --setup / --check --------------------------------------


def setup(rows: int = 1_000_000) -> None:
    """Create the source table with ``rows`` made-up users (and no target yet)."""
    for path in (source_path(), target_path()):
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
    with closing(sqlite3.connect(source_path())) as db, db:  # closed, and committed
        db.execute(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, email TEXT, created INTEGER)"
        )
        db.executemany(
            "INSERT INTO users VALUES (?, ?, ?, ?)",
            (
                (i, f"  User {i} ", f"User{i}@Example{i % 97}.COM ", 1_300_000_000 + i * 60)
                for i in range(1, rows + 1)
            ),
        )
    print(f"{source_path()}: {rows:,} rows in table users")


def check() -> bool:
    """Compare every target row with the transformed source row; print the verdict."""
    with closing(sqlite3.connect(f"file:{source_path()}?mode=ro", uri=True)) as db:
        db.execute("ATTACH DATABASE ? AS target", (f"file:{target_path()}?mode=ro",))
        (expected,) = db.execute("SELECT count(*) FROM users").fetchone()
        (migrated,) = db.execute("SELECT count(*) FROM target.users_v2").fetchone()
        rows = db.execute(
            "SELECT u.id, u.name, u.email, u.created, v.id, v.name, v.email, v.domain, v.created "
            "FROM users u LEFT JOIN target.users_v2 v ON v.id = u.id"
        )
        wrong = sum(1 for r in rows if transform(r[:4]) != r[4:])
    ok = migrated == expected and wrong == 0
    verdict = "ok" if ok else "NOT DONE"
    print(f"{target_path()}: {migrated:,}/{expected:,} rows migrated, {wrong:,} wrong: {verdict}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--setup", action="store_true", help="create the source database")
    action.add_argument("--check", action="store_true", help="verify the migrated rows")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for --setup")
    args = parser.parse_args(argv)
    if args.setup:
        setup(args.rows)
        return 0
    return 0 if check() else 1


if __name__ == "__main__":
    sys.exit(main())
