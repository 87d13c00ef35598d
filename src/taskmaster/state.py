"""A run's state in memory (what is resolved, the checkpoint) and a fresh run's state file.

:mod:`taskmaster.ledger` keeps this in SQLite. This module loads no SQLite: the master imports
it at start-up, and a fresh run's state file is created on a thread (:class:`FreshLedger`).
"""

from __future__ import annotations

import bisect
import fcntl
import os
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LedgerError, LedgerLocked, TaskmasterError

if TYPE_CHECKING:
    from .ledger import Failure, Ledger


def now_iso() -> str:
    # Milliseconds: checkpoints come a few per second, and tests and tools compare them.
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


class CompletedSet:
    """Resolved job ids: everything below ``watermark`` plus disjoint ranges above it.

    Ranges are half-open ``[start, end)`` kept sorted in two parallel lists; completions mostly
    arrive as whole contiguous batches, so the number of ranges stays near the number of
    batches in flight, not the number of jobs.
    """

    __slots__ = ("watermark", "_starts", "_ends")

    def __init__(self, watermark: int = 0, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self.watermark = watermark
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end - start)

    def add(self, start: int, count: int) -> int:
        """Mark ``[start, start+count)`` resolved; return how many of them were new."""
        end = start + count
        if count <= 0 or end <= self.watermark:
            return 0
        if start < self.watermark:
            start = self.watermark
        starts, ends = self._starts, self._ends
        # Find every range that overlaps or touches [start, end) and merge them.
        lo = bisect.bisect_left(ends, start)
        hi = bisect.bisect_right(starts, end)
        covered = 0
        new_start, new_end = start, end
        for i in range(lo, hi):
            s, e = starts[i], ends[i]
            covered += max(0, min(e, end) - max(s, start))
            new_start = min(new_start, s)
            new_end = max(new_end, e)
        starts[lo:hi] = [new_start]
        ends[lo:hi] = [new_end]
        if starts[0] == self.watermark:
            self.watermark = ends[0]
            del starts[0], ends[0]
        return (end - start) - covered

    def __contains__(self, job_id: int) -> bool:
        if job_id < self.watermark:
            return True
        i = bisect.bisect_right(self._starts, job_id) - 1
        return i >= 0 and job_id < self._ends[i]

    def covers(self, start: int, count: int) -> bool:
        """Whether every id in ``[start, start+count)`` is resolved (one bisect)."""
        end = start + count
        if end <= self.watermark:
            return True
        if start < self.watermark:
            start = self.watermark
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and end <= self._ends[i]

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    @property
    def highest(self) -> int:
        """One past the highest resolved id."""
        return self._ends[-1] if self._ends else self.watermark

    @property
    def resolved_above(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))


class Checkpoint:
    """What a checkpoint row holds, as the master and ``tm status`` see it."""

    __slots__ = (
        "watermark",
        "resume_id",
        "resume_job",
        "first_job",
        "ranges",
        "exhausted",
        "generator_error",
        "done",
        "failed",
        "duplicates",
        "retried",
        "total",
        "rate",
        "in_flight",
        "workers",
        "started",
        "updated",
    )

    def __init__(
        self,
        *,
        watermark: int = 0,
        resume_id: int = 0,
        resume_job: bytes | None = None,
        first_job: bytes | None = None,
        ranges: list[tuple[int, int]] | None = None,
        exhausted: bool = False,
        generator_error: str | None = None,
        done: int = 0,
        failed: int = 0,
        duplicates: int = 0,
        retried: int = 0,
        total: int | None = None,
        rate: float = 0.0,
        in_flight: int = 0,
        workers: int = 0,
        started: str | None = None,
        updated: str | None = None,
    ) -> None:
        self.watermark = watermark
        self.resume_id = resume_id
        self.resume_job = resume_job
        self.first_job = first_job
        self.ranges = ranges
        self.exhausted = exhausted
        self.generator_error = generator_error
        self.done = done
        self.failed = failed
        self.duplicates = duplicates
        self.retried = retried
        self.total = total
        self.rate = rate
        self.in_flight = in_flight
        self.workers = workers
        self.started = started
        self.updated = updated


class MasterLock:
    """An exclusive ``flock`` beside the state file: the kernel drops it when the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot create the lock file ({exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise LedgerLocked(
                f"another master ({holder}) is running on {self.path.with_suffix('')}; "
                "stop it first, or use --state for a separate run"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        # The holder writes its name just after it takes the lock: give it a moment.
        for _ in range(20):
            text = os.pread(fd, 200, 0).decode(errors="replace").strip()
            if text:
                return text
            time.sleep(0.01)
        return "pid unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def is_held(state_path: Path) -> bool:
        """Whether some master holds the state now (used by ``tm status``)."""
        lock_path = state_path.with_name(state_path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def lock_state(path: Path) -> MasterLock:
    """Make the state file's directory and take its one-master lock (``LedgerLocked``)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerError(f"{path}: cannot create its directory ({exc})") from exc
    lock = MasterLock(path)
    lock.acquire()
    return lock


def create_private(path: Path) -> None:
    """Create ``path`` empty and mode 0600 before SQLite opens it, so no other user can read
    the jobs; ``FileExistsError`` if it exists."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))


class FreshLedger:
    """The state file of a run that starts from nothing, created while the master starts.

    Creating one costs about 5 ms (loading SQLite, the schema, the journal's fsyncs), and a
    fresh run has nothing to read from it: the master first writes at a checkpoint. So the
    lock and the empty file (mode 0600) are taken at once: a locked state, or one whose file
    cannot be created, still fails before any job is sent. SQLite and the schema come on a
    thread, which the first write waits for; a failure there (a full disk) is raised by that
    write. Until then this answers what a new :class:`Ledger` would.

    The thread starts at :meth:`prepare`, which the master calls once its first jobs are out:
    before that, loading SQLite holds the GIL and the CPU that the master's handshakes with
    its workers need (4 ms of every start).
    """

    fresh = True
    discarded: Checkpoint | None = None

    @classmethod
    def start(cls, path: Path, identity: dict[str, Any]) -> FreshLedger | None:
        """Take the lock and create ``path``; None if it exists (then open it as a Ledger)."""
        lock = lock_state(path)
        try:
            create_private(path)
        except FileExistsError:
            lock.release()
            return None
        except OSError as exc:
            lock.release()
            raise LedgerError(f"{path}: cannot use the state file ({exc})") from exc
        try:
            return cls(path, identity, lock)
        except BaseException:  # nothing else would give the lock back
            lock.release()
            raise

    def __init__(self, path: Path, identity: dict[str, Any], lock: MasterLock) -> None:
        self.path = path
        self.checkpoint_row = Checkpoint(ranges=[])
        self.completed = CompletedSet()
        self.run_id = now_iso()  # the state's "created": what a Ledger reads back as run_id
        self._lock = lock
        self._ledger: Ledger | None = None
        self._error: BaseException | None = None
        self._identity = identity
        self._thread: threading.Thread | None = None
        self._prepared = False

    def prepare(self) -> None:
        """Start creating the file's tables, if not yet begun."""
        if self._prepared:
            return
        self._prepared = True
        thread = threading.Thread(
            target=self._create, args=(self._identity,), name="taskmaster-state", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (a process at its limit): here, then
            self._create(self._identity)
        else:
            self._thread = thread

    def _wait(self) -> None:
        self.prepare()
        if self._thread is not None:
            self._thread.join()

    def _create(self, identity: dict[str, Any]) -> None:
        try:
            from .ledger import Ledger

            self._ledger = Ledger.create(self.path, identity, self._lock, created=self.run_id)
        except BaseException as exc:  # raised where the master first needs the file
            self._error = exc

    def _ready(self) -> Ledger:
        self._wait()
        ledger = self._ledger
        if ledger is None:
            error = self._error
            if isinstance(error, TaskmasterError):
                raise error
            raise LedgerError(f"{self.path}: cannot create the state file ({error})") from error
        ledger.completed = self.completed  # the master's own, filled in since
        return ledger

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
        self._ready().record_failure(
            job_id, job, job_repr, attempts, error, message, traceback, worker
        )

    def clear_failure(self, job_id: int) -> None:
        self._ready().clear_failure(job_id)

    def checkpoint(self, state: Checkpoint) -> None:
        self._ready().checkpoint(state)
        self.checkpoint_row = state

    def failures(self) -> list[Failure]:
        return self._ready().failures()

    def close(self) -> None:
        self._wait()  # a state file is left whole even if nothing was ever written
        if self._ledger is not None:
            self._ledger.close()
        else:
            self._lock.release()
