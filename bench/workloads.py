"""Job functions shared by every peer contestant (imported by worker processes).

Everything here is a module-level function so that every pool can pickle it by
reference; ``bench/`` is put on ``PYTHONPATH`` by ``run.py`` so spawned workers
(dask, loky) import this module too.  The taskmaster task files in
``bench/tasks/`` carry their own copies of ``spin``/``sleep`` bodies because
they are copied to a temp directory: keep them identical.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

IO_SECONDS = 0.010
IO_CONCURRENCY = 50

_executor: ThreadPoolExecutor | None = None


def noop(x: Any) -> None:
    """The throughput/memory handler: ``def f(x): pass``."""


def spin(iters: int) -> int:
    """Pure-Python CPU work; ``run.py`` calibrates ``iters`` to ~5 ms."""
    acc = 0
    for i in range(iters):
        acc += i * i % 7
    return acc


def sleep_job(x: Any) -> None:
    time.sleep(IO_SECONDS)


async def asleep_job(x: Any) -> None:
    await asyncio.sleep(IO_SECONDS)


def asleep_sync(x: Any) -> None:
    """One async job on its own event loop (for peers that only run sync callables)."""
    asyncio.run(asleep_job(x))


def _threads() -> ThreadPoolExecutor:
    """One long-lived thread pool per worker process."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(IO_CONCURRENCY)
    return _executor


def sleep_batch(batch: list[Any]) -> int:
    """Run a batch of sleep jobs on this process's 50-thread pool."""
    for _ in _threads().map(sleep_job, batch):
        pass
    return len(batch)


async def _gather_bounded(batch: list[Any]) -> None:
    gate = asyncio.Semaphore(IO_CONCURRENCY)

    async def one(x: Any) -> None:
        async with gate:
            await asleep_job(x)

    await asyncio.gather(*(one(x) for x in batch))


def asleep_batch(batch: list[Any]) -> int:
    """Run a batch of async sleep jobs concurrently (at most 50 at a time)."""
    asyncio.run(_gather_bounded(batch))
    return len(batch)


def ints(n: int) -> Iterator[int]:
    """Jobs from a generator (no ``len``), as a user's ``get_jobs`` would yield them."""
    yield from range(n)


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch
