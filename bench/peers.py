"""Run ONE contestant on ONE scenario in this (fresh) process; print one JSON line.

    python bench/peers.py CONTESTANT SCENARIO '{"n": 20000, ...}'

``run.py`` launches this once per measurement so no pool, cluster or import
state leaks from one figure into the next.  The clock starts before the peer
library is imported and stops after its pool/cluster is shut down, so every
figure is end to end (imports, start-up, work, teardown).  Output, always one
line on stdout:

    {"status": "ok", "seconds": 1.23, "n": 20000, "extra": {...}}
    {"status": "skipped", "reason": "not installed: mpire"}
    {"status": "pending", "reason": "..."}
    {"status": "error", "error": "ValueError: ..."}

Params (all optional unless the scenario needs them): ``n`` jobs, ``iters``
(cpu), ``chunksize`` (pool/mpire), ``batch`` (io: jobs per in-worker batch),
``progress_path`` (memory: file this process rewrites with the number of
results seen, every 0.5 s), ``workdir`` (a fresh temp dir owned by run.py),
``tm_args`` (extra tm-run arguments), ``watermark`` (resume).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import workloads as wl

Params = dict[str, Any]
Result = dict[str, Any]

WORKERS = 2
BENCH_DIR = Path(__file__).resolve().parent
REPO_SRC = BENCH_DIR.parent / "src"
RUN_MAIN = "import sys; from taskmaster.cli import run_main; sys.exit(run_main())"


class Skipped(Exception):
    """The contestant's library is not installed."""


class Pending(Exception):
    """The measurement is not written yet."""


@dataclass
class Workload:
    """What a peer maps: ``func`` over ``items`` (``count`` of them)."""

    func: Callable[[Any], Any]
    items: Iterable[Any]
    count: int
    threads_per_worker: int = 1  # dask only


class Progress:
    """Counts results; optionally rewrites the count to a file every 0.5 s."""

    def __init__(self, path: str | None) -> None:
        self.done = 0
        if path:
            threading.Thread(target=self._report, args=(Path(path),), daemon=True).start()

    def _report(self, path: Path) -> None:
        while True:
            path.write_text(str(self.done))
            time.sleep(0.5)

    def consume(self, results: Iterable[Any]) -> None:
        for _ in results:
            self.done += 1


# --------------------------------------------------------------------- workloads


def workload(contestant: str, scenario: str, p: Params) -> Workload:
    n = int(p["n"])
    if scenario == "throughput":
        return Workload(wl.noop, range(n), n)
    if scenario == "memory":
        return Workload(wl.noop, wl.ints(n), n)
    if scenario == "cpu":
        return Workload(wl.spin, [int(p["iters"])] * n, n)
    if scenario in ("io-sleep", "io-async"):
        return io_workload(contestant, scenario, n, int(p.get("batch", wl.IO_CONCURRENCY)))
    raise ValueError(f"unknown scenario {scenario!r}")


def io_workload(contestant: str, scenario: str, n: int, batch: int) -> Workload:
    """Each peer with its best in-worker concurrency (50 threads or 50 coroutines)."""
    one = wl.sleep_job if scenario == "io-sleep" else wl.asleep_sync
    if contestant == "serial":
        return Workload(one, range(n), n)
    if contestant == "dask":  # dask's own knob: 50 threads in each worker process
        return Workload(one, range(n), n, threads_per_worker=wl.IO_CONCURRENCY)
    many = wl.sleep_batch if scenario == "io-sleep" else wl.asleep_batch
    return Workload(many, wl.batches(range(n), batch), math.ceil(n / batch))


# ------------------------------------------------------------------------- peers


def run_serial(w: Workload, p: Params, progress: Progress) -> Result:
    progress.consume(map(w.func, w.items))
    return {}


def run_pool(w: Workload, p: Params, progress: Progress) -> Result:
    from multiprocessing import Pool

    chunksize = int(p.get("chunksize", 1))
    with Pool(WORKERS) as pool:
        progress.consume(pool.imap_unordered(w.func, w.items, chunksize=chunksize))
    return {"chunksize": chunksize}


def run_ppe(w: Workload, p: Params, progress: Progress) -> Result:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(WORKERS) as ex:
        progress.consume(ex.map(w.func, w.items))
    return {}


def run_mpire(w: Workload, p: Params, progress: Progress) -> Result:
    from mpire import WorkerPool

    chunksize = p.get("chunksize")  # None: mpire's default (count / (n_jobs * 64))
    args = ((x,) for x in w.items)  # mpire unpacks iterable items into *args
    with WorkerPool(n_jobs=WORKERS) as pool:
        results = pool.imap_unordered(w.func, args, iterable_len=w.count, chunk_size=chunksize)
        progress.consume(results)
    return {"version": version("mpire"), "chunksize": chunksize or "auto"}


def run_joblib(w: Workload, p: Params, progress: Progress) -> Result:
    from joblib import Parallel, delayed

    return_as = "generator_unordered" if _joblib_has_unordered() else "generator"
    parallel = Parallel(n_jobs=WORKERS, backend="loky", return_as=return_as)
    progress.consume(parallel(delayed(w.func)(x) for x in w.items))
    return {"version": version("joblib"), "return_as": return_as}


def _joblib_has_unordered() -> bool:
    major, minor = (int(part) for part in version("joblib").split(".")[:2])
    return (major, minor) >= (1, 4)


def run_dask(w: Workload, p: Params, progress: Progress) -> Result:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = LocalCluster(
        n_workers=WORKERS,
        threads_per_worker=w.threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    extra: Result = {"version": version("distributed"), "threads_per_worker": w.threads_per_worker}
    items = w.items
    if not isinstance(items, Sized):  # "Dask no longer supports mapping over Iterators"
        items = list(items)
    with cluster, Client(cluster) as client:
        futures = client.map(w.func, items, pure=False)
        progress.consume(as_completed(futures, with_results=True))
    return extra


PeerRunner = Callable[[Workload, Params, Progress], Result]
PEERS: dict[str, tuple[str | None, PeerRunner]] = {
    # contestant: (module that must be importable, runner)
    "serial": (None, run_serial),
    "pool-cs1": (None, run_pool),
    "pool-best": (None, run_pool),
    "ppe": (None, run_ppe),
    "mpire": ("mpire", run_mpire),
    "joblib": ("joblib", run_joblib),
    "dask": ("distributed", run_dask),
}


def run_peer(contestant: str, scenario: str, p: Params) -> Result:
    module, runner = PEERS[contestant]
    if module and importlib.util.find_spec(module) is None:
        raise Skipped(f"not installed: {module}")
    progress = Progress(p.get("progress_path"))
    started = time.perf_counter()  # before the peer library is imported
    extra = runner(workload(contestant, scenario, p), p, progress)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "n": int(p["n"]), "done": progress.done, "extra": extra}


# -------------------------------------------------------------------- taskmaster

TM_TASKS: dict[str, tuple[str, list[str], list[str]]] = {
    # scenario: (tasks template in bench/tasks/, extra get_jobs kwargs, extra tm-run options).
    # The job source is the peers' (see workload()): range(n) for throughput, a generator
    # for memory.
    "throughput": ("noop.py", [], []),
    "memory": ("noop.py", ["source=generator"], ["--size", "1000"]),
    "cpu": ("cpu.py", [], []),
    "io-sleep": ("sleep.py", [], ["--threads", str(wl.IO_CONCURRENCY)]),
    "io-async": ("asleep.py", [], ["--concurrency", str(wl.IO_CONCURRENCY)]),
}


def tm_run_command() -> list[str]:
    """The working tree's tm-run (src/ on PYTHONPATH) if present, else tm-run on PATH."""
    if (REPO_SRC / "taskmaster").is_dir():
        return [sys.executable, "-c", RUN_MAIN]
    exe = shutil.which("tm-run")
    if exe is None:
        raise RuntimeError("taskmaster is not installed (no src/taskmaster, no tm-run)")
    return [exe]


def tm_invocation(scenario: str, p: Params) -> list[str]:
    """``tm-run TASKS 2 key=value… --no-progress --state FRESH [options] [--tm-args]``."""
    template, extra_kwargs, options = TM_TASKS[scenario]
    workdir = Path(p["workdir"])
    tasks = workdir / f"tasks_{Path(template).stem}.py"
    shutil.copyfile(BENCH_DIR / "tasks" / template, tasks)
    kwargs = [f"n={p['n']}", *extra_kwargs] + ([f"iters={p['iters']}"] if scenario == "cpu" else [])
    state = workdir / "state.db"  # fresh per run: no resume
    return [
        *tm_run_command(),
        str(tasks),
        str(WORKERS),
        *kwargs,
        "--no-progress",
        "--state",
        str(state),
        *options,
        *p.get("tm_args", []),
    ]


def run_taskmaster(scenario: str, p: Params) -> Result:
    """Time ``tm-run`` in this process, like the peers: from before ``import taskmaster``
    to the end of the run (workers forked, master served, workers stopped). For ``memory``
    become tm-run (same PID) so run.py samples the master's own process."""
    if scenario == "resume":
        return taskmaster_resume(p)
    cmd = tm_invocation(scenario, p)
    if scenario == "memory":  # run.py samples this PID: the master lives in tm-run
        sys.stdout.flush()
        os.execv(cmd[0], cmd)
    log_path = Path(p["workdir"]) / "tm-run.log"
    args = cmd[len(tm_run_command()) :]
    rc = _tm_run_in_process(args, log_path)
    seconds = _LAST_SECONDS[0]
    if rc != 0:
        raise RuntimeError(f"tm-run exited {rc}: {last_line(log_path)}")
    extra = {"tm_args": p.get("tm_args", []), "summary": last_line(log_path)}
    return {"seconds": seconds, "n": int(p["n"]), "extra": extra}


_LAST_SECONDS = [0.0]


def _tm_run_in_process(args: list[str], log_path: Path) -> int:
    """``tm-run ARGS`` via ``taskmaster.cli.main``, stderr (and the workers') to ``log_path``."""
    saved = os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log_fd, 2)
    try:
        started = time.perf_counter()
        if (REPO_SRC / "taskmaster").is_dir():
            sys.path.insert(0, str(REPO_SRC))
        from taskmaster.cli import main as tm_main

        try:
            tm_main(["run", *args])
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        _LAST_SECONDS[0] = time.perf_counter() - started
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(log_fd)
    return rc


def taskmaster_resume(p: Params) -> Result:
    """Seconds from launching tm-run to the first job running, on a ledger at watermark
    ``p["watermark"]`` (10,000,000), with ``get_jobs(last=…)``; the replay without ``last``
    goes in the note (see bench/resume.py, which builds the ledger outside the clock)."""
    from resume import measure_resume

    figures = measure_resume(Path(p["workdir"]), watermark=int(p.get("watermark", 10_000_000)))
    return {"seconds": figures["with_last_s"], "n": 1, "extra": figures}


def last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no stderr)"


# -------------------------------------------------------------------------- main


def measure(contestant: str, scenario: str, p: Params) -> Result:
    if contestant == "taskmaster":
        return run_taskmaster(scenario, p)
    return run_peer(contestant, scenario, p)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    contestant, scenario, raw = argv[1:]
    out: Result
    try:
        out = {"status": "ok", **measure(contestant, scenario, json.loads(raw))}
    except Skipped as exc:
        out = {"status": "skipped", "reason": str(exc)}
    except Pending as exc:
        out = {"status": "pending", "reason": str(exc)}
    except RuntimeError as exc:  # our own one-line reports (e.g. tm-run's exit)
        out = {"status": "error", "error": str(exc)}
    except Exception as exc:  # reported in the table, never crashes it
        out = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
