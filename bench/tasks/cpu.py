"""taskmaster tasks file for the cpu scenario: each job is a calibrated ~5 ms loop."""


def get_jobs(n="400", iters="100000", **kw):
    count = int(iters)
    for _ in range(int(n)):
        yield count


def handle_job(job):
    # Keep identical to bench/workloads.py:spin.
    acc = 0
    for i in range(job):
        acc += i * i % 7
    return acc
