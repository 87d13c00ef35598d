"""``taskmaster.run`` from a plain script: count the primes below a bound, in blocks.

    python examples/primes.py              # primes below 2,000,000 on 2 processes
    python examples/primes.py 10000000 4   # below 10,000,000 on 4

The functions are defined right here, in ``__main__``: ``taskmaster.run`` forks its workers
from this process, so they need no importable module. Each job writes its count to a file of
its own (written whole, then renamed: idempotent), and the script adds them up at the end.
Interrupt it and run it again: it resumes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import taskmaster

BLOCK = 50_000
OUT = Path(".primes")


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def get_jobs(below: str = "2000000") -> Iterator[tuple[int, int]]:
    """Blocks ``[lo, hi)``; without a ``last`` parameter, a resume replays the done prefix."""
    end = int(below)
    for lo in range(0, end, BLOCK):
        yield (lo, min(lo + BLOCK, end))


def handle_job(block: tuple[int, int]) -> None:
    lo, hi = block
    count = sum(1 for n in range(lo, hi) if is_prime(n))
    tmp = OUT / f"{lo}.{os.getpid()}.tmp"
    tmp.write_text(str(count))
    tmp.rename(OUT / f"{lo}.count")


def main(argv: list[str]) -> int:
    below = argv[1] if len(argv) > 1 else "2000000"
    workers = int(argv[2]) if len(argv) > 2 else 2
    OUT.mkdir(exist_ok=True)
    result = taskmaster.run(get_jobs, handle_job, workers, kwargs={"below": below})
    if not result.ok:
        return result.status
    blocks = [OUT / f"{lo}.count" for lo, _ in get_jobs(below)]
    total = sum(int(path.read_text()) for path in blocks)
    print(f"{total:,} primes below {int(below):,} ({result.done:,} blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
