"""IO-bound jobs with ``async def handle_job``: thousands of requests, 50 at a time per process.

    tm-run examples/fetch_async.py 2 --concurrency 50
    tm-run examples/fetch_async.py 2 n=20000 --concurrency 50

Each job asks a server for one item over TCP and checks the answer. So that the example runs
anywhere and never touches the network, ``init_worker`` starts that server itself, on a free
loopback port inside each worker process; it answers each request after ``FETCH_LATENCY``
seconds (default 0.02), like a slow API. For a real API, drop the server and ``await`` your
HTTP client in ``handle_job`` (created once per process, like the server address here).

One slot per worker would wait 20 ms per job, 50 jobs/s per process at best; with
``--concurrency 50`` each worker keeps 50 requests in the air on one event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Iterator

_server: tuple[str, int] | None = None


def _digest(item: int) -> str:
    return hashlib.sha256(str(item).encode()).hexdigest()[:16]


def start_server(latency: float) -> tuple[str, int]:
    """Start the stand-in API on a daemon thread with its own event loop; return its address."""
    ready: list[tuple[str, int]] = []
    started = threading.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                item = int(line.split()[-1])  # "GET <id>"
                await asyncio.sleep(latency)
                body = {"id": item, "digest": _digest(item)}
                writer.write(json.dumps(body).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0, backlog=1024)
        ready.append(server.sockets[0].getsockname()[:2])
        started.set()
        async with server:
            await server.serve_forever()

    threading.Thread(target=asyncio.run, args=(serve(),), name="fetch-server", daemon=True).start()
    if not started.wait(10):
        raise RuntimeError("the example server did not start")
    return ready[0]


def init_worker() -> None:
    """Once per worker process: start its server (for a real API: create the client here)."""
    global _server
    _server = start_server(float(os.environ.get("FETCH_LATENCY", "0.02")))


def count_jobs(n: str = "5000", **kwargs: str) -> int:
    return int(n)


def get_jobs(n: str = "5000", last: int | None = None, **kwargs: str) -> Iterator[int]:
    """Item ids 0 … n-1 (from ``last`` on a resume)."""
    yield from range(last or 0, int(n))


async def handle_job(item: int) -> None:
    """Fetch one item and check it; a wrong answer raises and is recorded as a failure."""
    assert _server is not None, "init_worker() starts the server"
    reader, writer = await asyncio.open_connection(*_server)
    try:
        writer.write(f"GET {item}\n".encode())
        await writer.drain()
        answer = json.loads(await reader.readline())
    finally:
        writer.close()
        await writer.wait_closed()
    if answer != {"id": item, "digest": _digest(item)}:
        raise ValueError(f"unexpected answer for item {item}: {answer!r}")
