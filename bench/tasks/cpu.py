"""taskmaster tasks file for the cpu scenario: each job is a calibrated ~5 ms loop."""

from collections.abc import Iterator


def get_jobs(n: str = "400", iters: str = "100000", **kw: str) -> Iterator[int]:
    count = int(iters)
    for _ in range(int(n)):
        yield count


def handle_job(job: int) -> int:
    # Keep identical to bench/workloads.py:spin.
    acc = 0
    for i in range(job):
        acc += i * i % 7
    return acc
