"""taskmaster tasks file for the io-sleep scenario: each job blocks 10 ms in time.sleep."""

import time
from collections.abc import Iterator


def get_jobs(n: str = "2000", **kw: str) -> Iterator[int]:
    yield from range(int(n))


def handle_job(job: int) -> None:
    time.sleep(0.010)
