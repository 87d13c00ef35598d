"""Chaos: SIGKILL the master again and again during one run; nothing is lost, re-runs bounded.

One ``tm-spawn`` (2 workers, recording every run of a job with its time) serves 50,000 short
jobs while ``tm-master`` is SIGKILLed at random moments (during start-up and resume, and
mid-run) at least 10 times and started again each time on the same address and state.

What is asserted, per kill k (the master dies at ``t_k``):

* every job ran at least once;
* ``unsaved_k``: jobs that had run for the dead master (counted once its workers have
  drained what it had handed them) but that its last checkpoint does not list as done.
* every extra run of a job follows a kill that came before the checkpoint which would have
  recorded its previous run: no job runs twice under one master, a resume re-runs nothing
  the ledger had as done, and so ``runs - jobs <= sum(unsaved_k)``;
* ``unsaved_k <= in_flight_k + interval_k``: the jobs in flight at the kill (those recorded
  after ``t_k``) plus one checkpoint interval's completions (those recorded in the
  ``checkpoint interval + ACK_SLACK_S`` before ``t_k``; the slack covers the worker's ack
  delay and a master loop delayed by a loaded machine).

The seed is printed, and ``TM_CHAOS_SEED=<seed>`` replays the same kill schedule.
"""

from __future__ import annotations

import collections
import os
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from taskmaster.ledger import CompletedSet, LedgerView
from tests.conftest import Processes, wait_until

pytestmark = pytest.mark.timeout(150)

JOBS = 50_000
KILLS = 12
MIN_KILLS = 10
CHECKPOINT_INTERVAL_S = 0.5
ACK_SLACK_S = 1.0

TASKS = """
import os, time

RECORD = os.environ["TM_TEST_RECORD"]

def get_jobs(n="1000", last=None):
    start = last if last is not None else 0
    for i in range(start, int(n)):
        yield i

def handle_job(job):
    time.sleep(0.0005)
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{job} {os.getpid()} {time.time():.6f}\\n".encode())
    finally:
        os.close(fd)
"""


@dataclass
class Kill:
    started_at: float  # time.time() when the killed master was started
    at: float  # time.time() of the SIGKILL
    mode: str
    restarted_at: float = 0.0  # when the next master was started (its workers had drained)
    unsaved: int = 0
    completed: CompletedSet | None = None
    in_flight: int = 0
    interval: int = 0
    watermark: int = 0


class Record:
    """The handlers' record file, parsed incrementally: (job, time) per run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: list[tuple[int, float]] = []
        self._offset = 0

    def refresh(self) -> list[tuple[int, float]]:
        if not self.path.exists():
            return self.runs
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self._offset += end
        for line in data[:end].splitlines():
            job, _, at = line.split()
            self.runs.append((int(job), float(at)))
        return self.runs

    def unique(self) -> int:
        return len({job for job, _ in self.refresh()})


def _completed(state: Path) -> CompletedSet:
    view = LedgerView(state)
    try:
        cp = view.checkpoint()
        return CompletedSet(cp.watermark, cp.ranges or [])
    finally:
        view.close()


def _settled(record: Record) -> bool:
    """Workers have run what the dead master handed them: the record stops growing."""
    before = len(record.refresh())
    time.sleep(0.3)
    return len(record.refresh()) == before


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.timeout(150)
def test_master_sigkilled_many_times_loses_nothing(
    procs: Processes, write_tasks, tmp_path: Path, endpoint: str
) -> None:
    seed = int(os.environ.get("TM_CHAOS_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (TM_CHAOS_SEED={seed} replays it)")
    write_tasks(TASKS)
    record = Record(tmp_path / "record.txt")
    env = {"TM_TEST_RECORD": str(record.path)}
    state = tmp_path / "state.db"
    master_args = (
        "tm-master", "tasks.py", f"n={JOBS}", "--address", endpoint, "--state", str(state),
        "--checkpoint-interval", str(CHECKPOINT_INTERVAL_S), "--no-progress",
    )  # fmt: skip
    logs: list[IO[bytes]] = []

    def start_master(k: int) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"master-{k}.log").open("wb")
        logs.append(log)
        return procs.start(*master_args, env=env, stdout=log, stderr=subprocess.STDOUT)

    spawn_log = (tmp_path / "spawn.log").open("wb")
    logs.append(spawn_log)
    spawn = procs.start(
        "tm-spawn", "tasks.py", "2", "--address", endpoint, env=env,
        stdout=spawn_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    kills: list[Kill] = []
    context = f"seed {seed}"
    try:
        started_at = time.time()
        master = start_master(0)
        while len(kills) < KILLS:
            near_end = record.unique() > JOBS - 8000
            mode = "early" if near_end or rng.random() < 0.25 else "mid-run"
            # early: anywhere in start-up (imports, ledger, resume) or the first batches;
            # mid-run: usually after a checkpoint or more, sometimes just before the first.
            life = rng.uniform(0.0, 0.8) if mode == "early" else rng.uniform(0.6, 2.0)
            deadline = started_at + life
            wait_until(lambda d=deadline, m=master: time.time() >= d or m.poll() is not None, 30)
            if master.poll() is not None:
                break
            kill = Kill(started_at, time.time(), mode)
            procs.kill(master, 9)
            master.wait(timeout=10)
            wait_until(lambda: _settled(record), 30)
            kill.restarted_at = started_at = time.time()
            if state.exists():
                completed = _completed(state)
                ran = {job for job, at in record.refresh() if kill.started_at < at}
                kill.unsaved = sum(1 for job in ran if job not in completed)
                kill.watermark = completed.watermark
                kill.completed = completed
            kills.append(kill)
            master = start_master(len(kills))
        last_log = tmp_path / f"master-{len(kills)}.log"
        assert master.wait(timeout=90) == 0, f"{context}\n{_tail(last_log)}"
        assert spawn.wait(timeout=30) == 0, f"{context}\n{_tail(tmp_path / 'spawn.log')}"
    finally:
        for log in logs:
            log.close()

    runs = record.refresh()
    counts = collections.Counter(job for job, _ in runs)
    reruns = len(runs) - len(counts)
    for kill in kills:
        # Between the kill and the next start no master exists: what ran then was in flight.
        kill.in_flight = sum(1 for _, at in runs if kill.at < at <= kill.restarted_at)
        window_start = max(kill.started_at, kill.at - CHECKPOINT_INTERVAL_S - ACK_SLACK_S)
        kill.interval = sum(1 for _, at in runs if window_start < at <= kill.at)
    report = "\n".join(
        f"  kill {i:2d} {k.mode:7s} after {k.at - k.started_at:4.2f}s: unsaved {k.unsaved:6,d}"
        f" <= in flight {k.in_flight:5,d} + interval {k.interval:6,d}; watermark {k.watermark:,}"
        for i, k in enumerate(kills, 1)
    )
    summary = (
        f"{context}: {len(kills)} kills, {JOBS:,} jobs, {len(runs):,} runs, {reruns:,} re-runs, "
        f"bound sum(unsaved) {sum(k.unsaved for k in kills):,}\n{report}"
    )
    print(summary)
    assert len(kills) >= MIN_KILLS, f"the run ended after {len(kills)} kills\n{summary}"
    missing = set(range(JOBS)) - set(counts)
    assert not missing, f"lost {len(missing)} jobs, e.g. {sorted(missing)[:10]}\n{summary}"
    assert set(counts) == set(range(JOBS)), summary
    same_life, known_done, explained = _classify_reruns(runs, kills)
    print(f"re-runs: {explained:,} after a kill, {len(same_life):,} under one master's life")
    assert not known_done, f"re-ran jobs the ledger had as done: {known_done[:10]}\n{summary}"
    # Without a kill between two runs, one master handed the same job out twice.
    assert not same_life, f"ran twice under one master: {same_life[:10]}\n{summary}"
    assert explained <= sum(k.unsaved for k in kills), summary
    for i, kill in enumerate(kills, 1):
        assert kill.unsaved <= kill.in_flight + kill.interval, f"kill {i}\n{summary}"


def _classify_reruns(
    runs: list[tuple[int, float]], kills: list[Kill]
) -> tuple[list[int], list[int], int]:
    """Each extra run, by where the run before it happened.

    Returns (jobs run again under the same master, jobs run again although the checkpoint
    after the kill had them as done, the number of extra runs explained by a kill).
    """
    by_job: dict[int, list[float]] = collections.defaultdict(list)
    for job, at in runs:
        by_job[job].append(at)
    same_life: list[int] = []
    known_done: list[int] = []
    explained = 0
    for job, times in by_job.items():
        times.sort()
        for prev, nxt in zip(times, times[1:], strict=False):
            kill = next((k for k in kills if k.started_at < prev <= k.restarted_at), None)
            if kill is None or nxt <= kill.restarted_at:
                same_life.append(job)
            elif kill.completed is not None and job in kill.completed:
                known_done.append(job)
            else:
                explained += 1
    return sorted(same_life), sorted(known_done), explained
