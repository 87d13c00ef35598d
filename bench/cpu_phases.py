"""Where the CPU scenario's time goes: CPU time per ~5 ms job early in a run and later on.

    python bench/cpu_phases.py [--rounds 5] [--workers 2] [--jobs 300]

Runs the same pure-Python job (``workloads.spin``) under ``multiprocessing.Pool`` and under
``tm-run``, alternating, and prints the median CPU time (``time.thread_time``) of one job in
three places of each worker's life:

* ``start``: 30 jobs back to back inside the worker's first call, before any other job;
* ``later``: 30 jobs back to back inside its 60th call (the same code, later in the run);
* ``each``: every ordinary job, one per call.

A worker that is slower ``later`` than at the ``start`` loses time to something in the run
itself, not to the job or to the call path. The ratio column is ``later / start``.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_SRC = BENCH_DIR.parent / "src"

TASKS = """
import os, time

RECORD = os.environ["CPU_PHASES_RECORD"]
_fd = None
_calls = 0


def get_jobs(n="300", iters="130000", **kw):
    for _ in range(int(n)):
        yield int(iters)


def spin(iters):
    acc = 0
    for i in range(iters):
        acc += i * i % 7
    return acc


def _timed(kind, iters):
    started = time.thread_time()
    spin(iters)
    os.write(_fd, f"{os.getpid()} {kind} {time.thread_time() - started:.7f}\\n".encode())


def handle_job(iters):
    global _fd, _calls
    if _fd is None:
        _fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    _calls += 1
    if _calls in (1, 60):
        for _ in range(30):
            _timed("start" if _calls == 1 else "later", iters)
    _timed("each", iters)
"""

POOL = """
import sys
sys.path.insert(0, sys.argv[1])
from multiprocessing import Pool
import phases_tasks as t
with Pool(int(sys.argv[2])) as pool:
    for _ in pool.imap_unordered(t.handle_job, t.get_jobs(sys.argv[3], sys.argv[4]), 10):
        pass
"""

RUN_MAIN = "import sys; from taskmaster.cli import run_main; sys.exit(run_main())"


def calibrate(target_s: float = 0.005) -> int:
    iters = 20_000
    while True:
        started = time.thread_time()
        acc = 0
        for i in range(iters):
            acc += i * i % 7
        took = time.thread_time() - started
        if took > 0.02:
            return int(iters * target_s / took)
        iters *= 2


def run_once(kind: str, workdir: Path, workers: int, jobs: int, iters: int) -> dict[str, float]:
    record = workdir / f"record-{kind}-{time.time_ns()}.txt"
    env = {**os.environ, "CPU_PHASES_RECORD": str(record)}
    if kind == "pool":
        cmd = [sys.executable, "-c", POOL, str(workdir), str(workers), str(jobs), str(iters)]
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_SRC), env.get("PYTHONPATH")]))
        state = workdir / f"state-{time.time_ns()}.db"
        tasks = str(workdir / "phases_tasks.py")
        options = [f"n={jobs}", f"iters={iters}", "--no-progress", "--state", str(state)]
        cmd = [sys.executable, "-c", RUN_MAIN, tasks, str(workers), *options]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    per_worker: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for line in record.read_text().splitlines():
        pid, phase, seconds = line.split()
        per_worker[(pid, phase)].append(float(seconds) * 1000)
    medians: dict[str, list[float]] = collections.defaultdict(list)
    for (_, phase), values in per_worker.items():
        medians[phase].append(statistics.median(values))
    return {phase: statistics.mean(values) for phase, values in medians.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args()
    iters = calibrate()
    results: dict[str, dict[str, list[float]]] = {
        kind: collections.defaultdict(list) for kind in ("pool", "taskmaster")
    }
    with tempfile.TemporaryDirectory(prefix="cpu-phases-") as tmp:
        workdir = Path(tmp)
        (workdir / "phases_tasks.py").write_text(TASKS)
        for round_ in range(args.rounds):
            order = ("pool", "taskmaster") if round_ % 2 == 0 else ("taskmaster", "pool")
            for kind in order:
                for phase, ms in run_once(kind, workdir, args.workers, args.jobs, iters).items():
                    results[kind][phase].append(ms)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    runs = f"median of {args.rounds} runs, {args.workers} workers"
    print(f"ms of CPU per job ({iters:,} iterations), {runs}")
    print(f"{'':12}{'start':>8}{'later':>8}{'each':>8}{'later/start':>13}")
    for kind, phases in results.items():
        start, later, each = (statistics.median(phases[p]) for p in ("start", "later", "each"))
        print(f"{kind:12}{start:8.3f}{later:8.3f}{each:8.3f}{later / start:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
