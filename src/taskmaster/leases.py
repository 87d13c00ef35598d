"""What the master keeps of what it sent: leases, the workers holding them, and id ranges.

A :class:`Lease` is one JOBS message a worker has not fully answered for; ``Lease.within``
cuts a worker's report to the jobs the lease holds, so a report can neither settle jobs
nobody ran nor make the master walk more than the lease. The helpers work on sorted ids and
half-open ``[start, end)`` ranges.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

from .feeder import Chunk
from .state import CompletedSet


class Lease:
    """Jobs sent to one worker in one message and not yet all acknowledged."""

    __slots__ = (
        "seq", "worker", "chunk", "sent_at", "remaining", "suspect", "reported", "_sorted_ids",
    )  # fmt: skip

    def __init__(
        self, seq: int, worker: bytes, chunk: Chunk, sent_at: float, remaining: int, suspect: bool
    ) -> None:
        self.seq = seq
        self.worker = worker
        self.chunk = chunk
        self.sent_at = sent_at
        self.remaining = remaining
        self.suspect = suspect
        self.reported: CompletedSet | None = None
        self._sorted_ids: list[int] | None = None

    def within(self, ranges: list[tuple[int, int]]) -> list[int] | range:
        """The ids of this lease in any of the ``[start, end)`` ranges, each once.

        A report never settles jobs outside the batch it names, and its work is bounded by
        the batch: a worker's bug (or a hostile peer with the key) would otherwise mark
        jobs done that nobody ran, or make the loop walk ranges of any size.
        """
        chunk = self.chunk
        if chunk.ids is None:
            if len(ranges) == 1:
                start, end = ranges[0]
                return range(max(start, chunk.first_id), min(end, chunk.first_id + len(chunk)))
            return list(ids_within(range(chunk.first_id, chunk.first_id + len(chunk)), ranges))
        if self._sorted_ids is None:
            self._sorted_ids = sorted(chunk.ids)
        return list(ids_within(self._sorted_ids, ranges))

    def report(self, first_id: int, count: int) -> int:
        """Note ``count`` jobs from ``first_id`` as reported; return how many were new here."""
        if self.reported is None:
            self.reported = CompletedSet(-1)
        return self.reported.add(first_id, count)

    def payload_of(self, job_id: int) -> bytes | None:
        chunk = self.chunk
        if chunk.ids is None:
            offset = job_id - chunk.first_id
            return chunk.pickles()[offset] if 0 <= offset < len(chunk) else None
        try:
            return chunk.pickles()[chunk.ids.index(job_id)]
        except ValueError:
            return None


class WorkerState:
    """What the master knows of one connected worker."""

    __slots__ = (
        "identity", "host", "pid", "slots", "credit", "last_seen", "leases", "done",
        "running_job", "running_s", "running_seen", "rate_mark", "rate", "end_window",
        "unreachable",
    )  # fmt: skip

    def __init__(
        self, identity: bytes, host: str, pid: int, slots: int, credit: int, last_seen: float
    ) -> None:
        self.identity = identity
        self.host = host
        self.pid = pid
        self.slots = slots
        self.credit = credit
        self.last_seen = last_seen
        self.leases: set[int] = set()
        self.done = 0
        self.running_job = -1
        self.running_s = 0.0
        self.running_seen = 0.0
        self.rate_mark = (0.0, 0)
        self.rate = 0.0
        # What it needs held at the end of a run (see Master._share); until its first ACK
        # says, what it first asked for.
        self.end_window = max(slots, credit)
        # A send to it failed (its connection is gone): nothing more goes to it, until a
        # probe finds it lost or it comes back with a fresh session (Master handles both).
        self.unreachable = False

    @property
    def name(self) -> str:
        return f"{self.host}:{self.pid}"


def chunk_of(jobs: list[tuple[int, bytes]], *, consecutive: bool = False) -> Chunk:
    """A chunk of (id, pickle) pairs; with ``consecutive``, ids that follow each other make
    one by its first id (acked by ranges) rather than by an explicit list."""
    ids = [job_id for job_id, _ in jobs]
    payloads = [payload for _, payload in jobs]
    if consecutive and ids[-1] - ids[0] + 1 == len(ids) and ids == sorted(ids):
        return Chunk(ids[0], payloads)
    return Chunk(ids[0], payloads, ids)


def ids_within(ids: Sequence[int], ranges: list[tuple[int, int]]) -> Iterator[int]:
    """The ids (sorted) that fall in any of the ``[start, end)`` ranges."""
    reach = -1
    for start, end in sorted(ranges):
        start = max(start, reach)  # overlaps are walked once
        if start < end:
            yield from ids[bisect.bisect_left(ids, start) : bisect.bisect_left(ids, end)]
            reach = end


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[start, end)`` ranges sorted, with overlapping and touching ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        elif start < end:
            out.append((start, end))
    return out


def runs(ids: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Ascending ``ids`` as (first id, count) runs of consecutive ones."""
    start = previous = 0
    empty = True
    for job_id in ids:
        if empty:
            start, empty = job_id, False
        elif job_id != previous + 1:
            yield start, previous - start + 1
            start = job_id
        previous = job_id
    if not empty:
        yield start, previous - start + 1
