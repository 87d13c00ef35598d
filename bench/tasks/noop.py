"""taskmaster tasks file for the throughput and memory scenarios: no-op jobs.

Each scenario gives taskmaster the job source it gives the peers: ``range(n)`` for
throughput (``Pool.imap_unordered(noop, range(n))`` and so on), a generator for memory
(``workloads.ints``, which has no ``len`` for a peer to take a shortcut with).
"""

from collections.abc import Iterable, Iterator


def get_jobs(n: str = "200000", source: str = "range", **kw: str) -> Iterable[int]:
    if source == "generator":
        return _ints(int(n))
    return range(int(n))


def _ints(n: int) -> Iterator[int]:
    yield from range(n)


def handle_job(job: int) -> None:
    pass
