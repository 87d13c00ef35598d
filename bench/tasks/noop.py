"""taskmaster tasks file for the throughput and memory scenarios: no-op jobs."""

from collections.abc import Iterator


def get_jobs(n: str = "200000", **kw: str) -> Iterator[int]:
    yield from range(int(n))


def handle_job(job: int) -> None:
    pass
