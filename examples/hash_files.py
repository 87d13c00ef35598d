"""SHA-256 of every file under a directory tree, into a SQLite table: CPU and IO.

    tm-run examples/hash_files.py 4 root=/usr/share
    sqlite3 hashes.db 'SELECT count(*), sum(size) FROM hashes'

``root`` (default: the current directory) is walked in sorted path order, so that a resume
can go straight to ``last`` instead of replaying the walk. Jobs are absolute paths: workers on
other machines need the same tree at the same place (a shared file system).

Each worker process opens one connection to the output database in ``init_worker`` and keeps
it: ``HASHES_DB`` names the file (default ``hashes.db`` in the worker's directory). Writes are
``INSERT OR REPLACE`` keyed by path, so a job that runs twice after a crash leaves one row.
A file that vanishes or cannot be read fails its job: it is recorded, and the run goes on.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

BLOCK_BYTES = 1 << 20
_db: sqlite3.Connection | None = None


def _walk(directory: Path, start: tuple[str, ...]) -> Iterator[Path]:
    """Regular files under ``directory`` in sorted path order, from the path ``start`` on.

    Sorting the entries of each directory by name and descending into a directory where its
    name falls makes this the order of the paths' parts, so ``start`` prunes whole subtrees.
    """
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return  # unreadable directory: nothing under it can be hashed
    for entry in entries:
        if start and entry.name < start[0]:
            continue
        rest = start[1:] if start and entry.name == start[0] else ()
        start = ()  # every later entry sorts after the start
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), rest)
        elif entry.is_file(follow_symlinks=False) and not rest:
            yield Path(entry.path)


def count_jobs(root: str = ".", **kwargs: str) -> int:
    """One walk to count the files, for the ETA (cheap next to reading every byte)."""
    return sum(1 for _ in _walk(Path(root).resolve(), ()))


def get_jobs(root: str = ".", last: str | None = None, **kwargs: str) -> Iterator[str]:
    """Absolute paths of the files under ``root``; on resume, from ``last`` on."""
    base = Path(root).resolve()
    start = Path(last).relative_to(base).parts if last else ()
    for path in _walk(base, start):
        yield str(path)


def init_worker() -> None:
    """Once per worker process: one connection to the output, kept for every job."""
    global _db
    _db = sqlite3.connect(os.environ.get("HASHES_DB", "hashes.db"), timeout=60)
    _db.execute("PRAGMA journal_mode=WAL")
    _db.execute(
        "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, sha256 TEXT)"
    )


def handle_job(path: str) -> None:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            digest.update(block)
            size += len(block)
    assert _db is not None, "init_worker() opens the database"
    with _db:
        _db.execute(
            "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?)", (path, size, digest.hexdigest())
        )
