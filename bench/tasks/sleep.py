"""taskmaster tasks file for the io-sleep scenario: each job blocks 10 ms in time.sleep."""

import time


def get_jobs(n="2000", **kw):
    yield from range(int(n))


def handle_job(job):
    time.sleep(0.010)
