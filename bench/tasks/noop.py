"""taskmaster tasks file for the throughput and memory scenarios: no-op jobs."""


def get_jobs(n="200000", **kw):
    yield from range(int(n))


def handle_job(job):
    pass
