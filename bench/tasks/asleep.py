"""taskmaster tasks file for the io-async scenario: each job awaits asyncio.sleep(10 ms)."""

import asyncio


def get_jobs(n="2000", **kw):
    yield from range(int(n))


async def handle_job(job):
    await asyncio.sleep(0.010)
