"""taskmaster tasks file for the io-async scenario: each job awaits asyncio.sleep(10 ms)."""

import asyncio
from collections.abc import Iterator


def get_jobs(n: str = "2000", **kw: str) -> Iterator[int]:
    yield from range(int(n))


async def handle_job(job: int) -> None:
    await asyncio.sleep(0.010)
