"""The 2012 tool's own example, kept so its commands still work as written.

::

    tm-master taskmaster.example      # in one terminal
    tm-spawn taskmaster.example 4     # in another (tm-slave taskmaster.example: one worker)
    tm-run taskmaster.example 4       # or both in one command
"""

from __future__ import annotations

from collections.abc import Iterator


def get_jobs(last: int | None = None) -> Iterator[int]:
    """The numbers 0 to 999; on a resume, from ``last`` (the first one not known done)."""
    yield from range(last or 0, 1000)


def handle_job(job: int) -> None:
    """Say which job this is, as the original did (a whole line in one write: workers share
    the terminal)."""
    print(f"Got {job!r}!\n", end="", flush=True)
