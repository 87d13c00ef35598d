"""Resume figures: start → first dispatched job on a ledger whose watermark is 10,000,000.

    python bench/resume.py [--watermark N] [--tail N] [--workdir DIR]

prints one JSON line::

    {"watermark": 10000000, "with_last_s": 0.41, "without_last_s": 1.32,
     "replay_rate": 9800000.0, "replayed": 10000000, "tail": 1000}

* ``with_last_s``: seconds from launching ``tm-run TASKS 2`` to the first job running on a
  worker, when ``get_jobs(last=…)`` resumes at the watermark (target: under 1 s).
* ``without_last_s``: the same with a ``get_jobs`` that has no ``last`` parameter: the master
  replays the done prefix from the generator and skips it.
* ``replay_rate``: jobs/s of that replay, from the master's own log line.

The ledger is built directly with the Ledger API (a checkpoint at the watermark, as a run of
10M jobs would have left it), outside the clock. Each figure runs ``tm-run`` to completion over
``tail`` more jobs. ``measure_resume()`` is what ``bench/peers.py``'s ``resume`` scenario can
call.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_SRC = BENCH_DIR.parent / "src"
if (REPO_SRC / "taskmaster").is_dir() and str(REPO_SRC) not in sys.path:
    sys.path.insert(0, str(REPO_SRC))

from taskmaster.ledger import Checkpoint, CompletedSet, Ledger  # noqa: E402
from taskmaster.protocol import PROTOCOL_VERSION  # noqa: E402

RUN_MAIN = "import sys; from taskmaster.cli import run_main; sys.exit(run_main())"
WORKERS = 2

_HANDLER = """
import os, time

def handle_job(job):
    # The first job to run anywhere leaves the time it started; the rest do nothing.
    try:
        fd = os.open(os.environ["TM_BENCH_FIRST"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.write(fd, repr(time.time()).encode())
    os.close(fd)
"""

TASKS_WITH_LAST = (
    """
def get_jobs(n="0", last=None):
    yield from range(last if last is not None else 0, int(n))
"""
    + _HANDLER
)

TASKS_WITHOUT_LAST = (
    """
def get_jobs(n="0"):
    yield from range(int(n))
"""
    + _HANDLER
)

_REPLAY = re.compile(r"replayed (\d+) done jobs in ([\d.]+)s \((\d+) jobs/s\)")


def build_ledger(state: Path, watermark: int, n: int) -> None:
    """A state file as a run of ``get_jobs(n=…)`` stopped at ``watermark`` would leave it."""
    identity = {"target": "tasks", "kwargs": {"n": str(n)}, "protocol": PROTOCOL_VERSION}
    ledger = Ledger.open(state, identity)
    try:
        ledger.completed = CompletedSet(watermark)
        ledger.checkpoint(
            Checkpoint(
                resume_id=watermark,
                resume_job=pickle.dumps(watermark, pickle.HIGHEST_PROTOCOL),
                first_job=pickle.dumps(0, pickle.HIGHEST_PROTOCOL),
                done=watermark,
                total=n,
                started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
        )
    finally:
        ledger.close()


def _tm_run() -> list[str]:
    return [sys.executable, "-c", RUN_MAIN]


def time_to_first_job(
    workdir: Path, source: str, watermark: int, tail: int, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Launch tm-run on a fresh copy of the ledger; seconds until the first job ran."""
    workdir.mkdir(parents=True, exist_ok=True)
    tasks = workdir / "tasks.py"
    tasks.write_text(source)
    state = workdir / "state.db"
    first = workdir / "first-job"
    n = watermark + tail
    build_ledger(state, watermark, n)
    env = {**os.environ, "TM_BENCH_FIRST": str(first)}
    if (REPO_SRC / "taskmaster").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_SRC), env.get("PYTHONPATH")]))
    command = [*_tm_run(), "tasks.py", str(WORKERS), f"n={n}", "--state", str(state)]
    command.append("--no-progress")
    started = time.time()
    proc = subprocess.Popen(
        command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # tm-run and the workers it forked
        _, stderr = proc.communicate()
        raise RuntimeError(f"tm-run did not finish in {timeout_s:.0f}s: {stderr[-500:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"tm-run exited {proc.returncode}: {stderr.strip()[-500:]}")
    seconds = float(first.read_text()) - started
    out: dict[str, Any] = {"seconds": seconds}
    match = _REPLAY.search(stderr)
    if match:
        out["replayed"] = int(match.group(1))
        out["replay_s"] = float(match.group(2))
        out["replay_rate"] = float(match.group(3))
    return out


def measure_resume(workdir: Path, watermark: int = 10_000_000, tail: int = 1000) -> dict[str, Any]:
    """Both figures, as one dict (the JSON line this script prints)."""
    with_last = time_to_first_job(workdir / "with-last", TASKS_WITH_LAST, watermark, tail)
    without = time_to_first_job(workdir / "without-last", TASKS_WITHOUT_LAST, watermark, tail)
    return {
        "watermark": watermark,
        "with_last_s": round(with_last["seconds"], 3),
        "without_last_s": round(without["seconds"], 3),
        "replay_rate": without.get("replay_rate"),
        "replayed": without.get("replayed"),
        "tail": tail,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watermark", type=int, default=10_000_000)
    parser.add_argument("--tail", type=int, default=1000, help="jobs after the watermark")
    parser.add_argument("--workdir", type=Path, help="default: a fresh temp dir")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        figures = measure_resume(args.workdir, args.watermark, args.tail)
    else:
        with tempfile.TemporaryDirectory(prefix="tm-resume-") as tmp:
            figures = measure_resume(Path(tmp), args.watermark, args.tail)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
