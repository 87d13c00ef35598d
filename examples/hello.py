"""The smallest tasks file: square the numbers 0 … n-1, on as many processes as you like.

    tm-run examples/hello.py 4              # 4 worker processes, 20,000 jobs
    tm-run examples/hello.py 4 n=1000000    # key=value arguments reach get_jobs and count_jobs
    tm status examples/hello.py             # what the state file says, from another terminal

Each job sleeps half a millisecond so that the progress screen has something to show.
"""

from __future__ import annotations

import time
from collections.abc import Iterator


def count_jobs(n: str = "20000", **kwargs: str) -> int:
    """The total, for the bar's percentage and the ETA."""
    return int(n)


def get_jobs(n: str = "20000", last: int | None = None, **kwargs: str) -> Iterator[int]:
    """Yield 0 … n-1; on resume ``last`` is the first number not known to be done."""
    yield from range(last or 0, int(n))


def handle_job(number: int) -> None:
    """Square a number. Idempotent: running it twice changes nothing."""
    time.sleep(0.0005)
    _ = number * number
