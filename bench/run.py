"""Benchmark taskmaster against its peers; print one table.

Run from the repository root::

    pip install -e ".[bench]"             # mpire, joblib, dask[distributed]
    python bench/run.py                    # every scenario, median of 3
    python bench/run.py --quick            # smaller sizes, 1 repeat: a smoke run
    python bench/run.py --scenario cpu --scenario io --repeat 5 --json out.json
    python bench/run.py --tm-args "--size 500"   # extra args for every tm-run

Every measurement is one fresh ``python bench/peers.py CONTESTANT SCENARIO
PARAMS`` subprocess with a hard timeout; its clock runs inside it, end to end
(library import, pool/cluster start-up, work, shutdown).  Repeats are
round-robin (every contestant once, then again, starting one further along
each round) and the figure is the median.  Contestants: serial (plain loop),
pool-cs1 / pool-best (multiprocessing.Pool(2).imap_unordered, chunksize 1 /
best of a few), ppe (ProcessPoolExecutor(2).map), mpire (WorkerPool(2)
.imap_unordered), joblib (Parallel(2, loky, generator_unordered)), dask
(LocalCluster 2 processes + client.map/as_completed) and taskmaster
(``tm-run TASKS 2 ...`` from the working tree's src/, launch to exit).

Scenarios (2 workers everywhere):

throughput  200,000 no-op jobs; jobs/s including start-up.  dask runs 5,000
            (it needs minutes for 200k); a rate, so still comparable.
cpu         400 jobs of ~5 ms pure-Python CPU (calibrated here, once); speedup =
            serial time / contestant time, serial measured in the same run.
memory      20,000,000 no-op jobs from a generator; peak RSS of the coordinating
            process (sampled every 0.5 s from /proc/PID/status, plus VmHWM),
            stopped after --memory-seconds or when RSS passes --memory-cap-mib;
            "flat" when RSS at the end is < 10% above RSS at 2 s.
io-sleep    2,000 jobs of time.sleep(10 ms); jobs/s and wall time, each peer
io-async    with 50-way concurrency inside each worker (threads / coroutines).
            (``--scenario io`` selects both.)  serial runs 200 jobs.
resume      taskmaster only: start → first dispatched job on a ledger at
            watermark 10,000,000.  Placeholder (peers.taskmaster_resume).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from workloads import spin  # noqa: E402

PEERS_PY = BENCH_DIR / "peers.py"
REPO_SRC = BENCH_DIR.parent / "src"
CONTESTANTS = ["serial", "pool-cs1", "pool-best", "ppe", "mpire", "joblib", "dask", "taskmaster"]
REQUIRES = {"mpire": "mpire", "joblib": "joblib", "dask": "distributed"}
SCENARIOS = ["throughput", "cpu", "memory", "io-sleep", "io-async", "resume"]
ALIASES = {"io": ["io-sleep", "io-async"]}
RESUME_WATERMARK = 10_000_000
FLAT_GROWTH = 0.10
SAMPLE_EVERY = 0.5


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class Sizes:
    throughput_n: int = 200_000
    throughput_slow_n: int = 5_000  # dask
    cpu_n: int = 400
    io_n: int = 2_000
    io_serial_n: int = 200
    memory_n: int = 20_000_000
    memory_seconds: float = 10.0
    repeat: int = 3


QUICK = Sizes(
    throughput_n=20_000,
    throughput_slow_n=1_000,
    cpu_n=80,
    io_n=400,
    io_serial_n=50,
    memory_seconds=4.0,
    repeat=1,
)

POOL_BEST = {  # chunksizes pool-best tries (io: jobs per in-worker thread batch)
    "throughput": [100, 1_000, 10_000],
    "cpu": [2, 10, 50],
    "io": [100, 250, 1_000],
}
MEMORY_CHUNKSIZE = 1_000  # pool-best/mpire in memory: same batch as tm-run --size 1000
IO_BATCH = 50  # pool-cs1/ppe/mpire/joblib in io: one 50-thread batch per task


@dataclass(frozen=True)
class Config:
    sizes: Sizes
    repeat: int
    timeout: float
    memory_seconds: float
    memory_cap_mib: float
    tm_args: list[str]
    scenarios: list[str]
    json_path: Path | None


@dataclass
class Entry:
    """One contestant configuration that gets launched once per repeat."""

    contestant: str
    params: dict[str, Any]
    variant: str = ""  # pool-best's candidate, e.g. "chunksize=1000"
    note: str = ""


@dataclass
class MemoryTrace:
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # t, RSS, HWM
    capped: bool = False
    cap_mib: float = 0.0
    exited: bool = False
    done: int | None = None


@dataclass
class Outcome:
    status: str  # ok | error | skipped | pending
    seconds: float | None = None
    n: int | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    memory: MemoryTrace | None = None


@dataclass
class Run:
    scenario: str
    rep: int
    entry: Entry
    outcome: Outcome


@dataclass
class Row:
    scenario: str
    contestant: str
    figure: str
    value: float | None = None  # what "vs taskmaster" divides
    note: str = ""
    lower_bound: bool = False  # value is a cap: the real one is higher


# ---------------------------------------------------------------------- planning


def calibrate_spin(target: float = 0.005) -> int:
    """Iterations of ``workloads.spin`` that take ``target`` seconds here (best of 5)."""
    probe = 20_000
    while True:
        best = min(_time_spin(probe) for _ in range(5))
        if best >= 0.05:
            return max(1, round(probe * target / best))
        probe *= 2


def _time_spin(iters: int) -> float:
    started = time.perf_counter()
    spin(iters)
    return time.perf_counter() - started


def plan(scenario: str, cfg: Config) -> list[Entry]:
    if scenario == "resume":
        return [Entry("taskmaster", {"n": 1, "watermark": RESUME_WATERMARK})]
    planner = {"throughput": plan_throughput, "cpu": plan_cpu, "memory": plan_memory}
    entries = planner[scenario](cfg) if scenario in planner else plan_io(cfg, scenario)
    return [e for name in CONTESTANTS for e in entries if e.contestant == name]


def _everyone(params: dict[str, Any]) -> list[Entry]:
    return [Entry(c, dict(params)) for c in CONTESTANTS if c != "pool-best"]


def _pool_best(params: dict[str, Any], sizes: list[int], key: str = "chunksize") -> list[Entry]:
    return [Entry("pool-best", {**params, key: size}, variant=f"{key}={size}") for size in sizes]


def plan_throughput(cfg: Config) -> list[Entry]:
    n, slow = cfg.sizes.throughput_n, cfg.sizes.throughput_slow_n
    entries = _everyone({"n": n}) + _pool_best({"n": n}, POOL_BEST["throughput"])
    for entry in entries:
        if entry.contestant == "dask":
            entry.params["n"] = slow
            entry.note = f"N={slow:,} (slow peer, capped)"
    return entries


def plan_cpu(cfg: Config) -> list[Entry]:
    iters = calibrate_spin()
    params = {"n": cfg.sizes.cpu_n, "iters": iters}
    entries = _everyone(params) + _pool_best(params, POOL_BEST["cpu"])
    print(f"cpu: calibrated {iters:,} iterations ≈ 5 ms per job", file=sys.stderr)
    return entries


def plan_memory(cfg: Config) -> list[Entry]:
    entries = _everyone({"n": cfg.sizes.memory_n})
    entries.append(Entry("pool-best", {"n": cfg.sizes.memory_n}))
    for entry in entries:
        if entry.contestant in ("mpire", "pool-best"):
            entry.params["chunksize"] = MEMORY_CHUNKSIZE
            entry.note = f"chunksize={MEMORY_CHUNKSIZE}"
        elif entry.contestant == "dask":
            entry.note = "jobs list()ed first: dask refuses iterators"
        elif entry.contestant == "taskmaster":
            entry.note = "--size 1000; tm-run process sampled"
    return entries


def plan_io(cfg: Config, scenario: str) -> list[Entry]:
    n = cfg.sizes.io_n
    entries = _everyone({"n": n, "batch": IO_BATCH})
    entries += _pool_best({"n": n}, POOL_BEST["io"], key="batch")
    for entry in entries:
        if entry.contestant == "serial":
            entry.params["n"] = cfg.sizes.io_serial_n
            entry.note = f"N={cfg.sizes.io_serial_n:,} (plain loop, capped)"
        elif entry.contestant == "dask":
            entry.note = "threads_per_worker=50"
        elif entry.contestant == "taskmaster":
            entry.note = "--threads 50" if scenario == "io-sleep" else "--concurrency 50"
        elif entry.contestant != "pool-best":
            entry.note = f"{IO_BATCH}-job batches, 50-way inside each worker"
    return entries


# --------------------------------------------------------------------- launching


def peer_env() -> dict[str, str]:
    paths = [str(BENCH_DIR), str(REPO_SRC), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def installed(contestant: str) -> bool:
    module = REQUIRES.get(contestant)
    return module is None or find_spec(module) is not None


def launch(scenario: str, entry: Entry, cfg: Config) -> Outcome:
    """One fresh peers.py subprocess in its own session; its whole group is stopped after."""
    if not installed(entry.contestant):
        return Outcome("skipped", message=f"not installed: {REQUIRES[entry.contestant]}")
    with tempfile.TemporaryDirectory(prefix="tm-bench-") as tmp:
        work = Path(tmp)
        params = {**entry.params, "workdir": tmp, "tm_args": cfg.tm_args}
        if scenario == "memory":
            params["progress_path"] = str(work / "progress")
        cmd = [sys.executable, str(PEERS_PY), entry.contestant, scenario, json.dumps(params)]
        with (work / "out").open("wb") as out, (work / "err").open("wb") as err:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, env=peer_env(), start_new_session=True
            )
            try:
                if scenario == "memory":
                    return memory_outcome(proc, work, cfg, int(entry.params["n"]))
                return timed_outcome(proc, work, cfg.timeout)
            finally:
                stop_group(proc)


def timed_outcome(proc: subprocess.Popen[bytes], work: Path, timeout: float) -> Outcome:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome("error", message=f"timeout after {timeout:g} s (hard cap)")
    return parse_outcome(proc, work)


def parse_outcome(proc: subprocess.Popen[bytes], work: Path) -> Outcome:
    lines = (work / "out").read_text(errors="replace").strip().splitlines()
    try:
        data = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return Outcome("error", message=f"exit {proc.returncode}: {last_line(work / 'err')}")
    status = data["status"]
    message = data.get("error") or data.get("reason") or ""
    return Outcome(status, data.get("seconds"), data.get("n"), message, data.get("extra", {}))


def last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def stop_group(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM then SIGKILL the session we started (the peer and its workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_members(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while group_members(proc.pid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.05)
    proc.poll()
    if proc.returncode is None:
        proc.wait()


# ------------------------------------------------------------------------ memory


def read_status(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) in MiB from /proc/PID/status, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    if len(values) < 2:
        return None
    return values["VmRSS"], values["VmHWM"]


def sample_memory(proc: subprocess.Popen[bytes], cfg: Config) -> MemoryTrace:
    trace = MemoryTrace()
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        status = read_status(proc.pid)
        if status:
            trace.samples.append((elapsed, *status))
        if proc.poll() is not None:
            trace.exited = True
            return trace
        if status and status[0] > cfg.memory_cap_mib:
            trace.capped, trace.cap_mib = True, cfg.memory_cap_mib
            return trace
        if elapsed >= cfg.memory_seconds:
            return trace
        time.sleep(SAMPLE_EVERY - (time.monotonic() - started) % SAMPLE_EVERY)


def memory_outcome(proc: subprocess.Popen[bytes], work: Path, cfg: Config, n: int) -> Outcome:
    trace = sample_memory(proc, cfg)
    progress = work / "progress"
    if progress.exists() and progress.read_text().strip():
        trace.done = int(progress.read_text())
    if trace.exited:
        if proc.returncode == 0 and not (work / "out").read_text().strip():
            trace.done = n  # exec'd tm-run: no JSON line, and exit 0 means every job is done
            return Outcome("ok", n=n, memory=trace)
        outcome = parse_outcome(proc, work)
        if outcome.status == "ok":
            trace.done = outcome.n
            outcome.memory = trace
        return outcome
    if not trace.samples:
        return Outcome("error", message="no /proc samples")
    return Outcome("ok", memory=trace)


# ----------------------------------------------------------------------- running


def rotated(entries: list[Entry], by: int) -> list[Entry]:
    k = by % len(entries) if entries else 0
    return entries[k:] + entries[:k]


def run_scenario(scenario: str, cfg: Config) -> list[Run]:
    """Round-robin: every entry once per round, each round starting one further on."""
    entries = plan(scenario, cfg)
    runs: list[Run] = []
    skipped: set[str] = set()
    for rep in range(cfg.repeat):
        for entry in rotated(entries, rep):
            if entry.contestant in skipped:
                continue
            outcome = launch(scenario, entry, cfg)
            if outcome.status in ("skipped", "pending"):
                skipped.add(entry.contestant)  # no point repeating
            runs.append(Run(scenario, rep, entry, outcome))
            log_run(runs[-1], cfg.repeat)
    return runs


def log_run(run: Run, repeat: int) -> None:
    o = run.outcome
    label = run.entry.contestant + (f"[{run.entry.variant}]" if run.entry.variant else "")
    if o.memory and o.memory.samples:
        what = f"peak {max(s[1] for s in o.memory.samples):.0f} MiB"
    elif o.seconds is not None:
        what = f"{o.seconds:.3f} s"
    else:
        what = f"{o.status} {o.message}".strip()
    print(f"[{run.scenario} {run.rep + 1}/{repeat}] {label}: {what}", file=sys.stderr)


# ----------------------------------------------------------------------- summary


@dataclass
class Pick:
    """The runs a row is made from: the best variant's successful runs."""

    entry: Entry
    ok: list[Outcome]
    failed: list[Outcome]
    variants: dict[str, float] = field(default_factory=dict)  # variant -> median s

    @property
    def median(self) -> float:
        return statistics.median(o.seconds for o in self.ok if o.seconds is not None)


def pick(runs: list[Run]) -> Pick:
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.entry.variant, []).append(run)
    picks = [_pick_variant(group) for group in by_variant.values()]
    timed = [p for p in picks if p.ok and p.ok[0].seconds is not None]
    best = min(timed, key=lambda p: p.median) if timed else picks[0]
    if len(picks) > 1:
        best.variants = {p.entry.variant: p.median for p in timed}
    return best


def _pick_variant(runs: list[Run]) -> Pick:
    ok = [r.outcome for r in runs if r.outcome.status == "ok"]
    failed = [r.outcome for r in runs if r.outcome.status != "ok"]
    return Pick(runs[0].entry, ok, failed)


def summarize(scenario: str, runs: list[Run]) -> list[Row]:
    picks = {
        c: pick([r for r in runs if r.entry.contestant == c])
        for c in CONTESTANTS
        if any(r.entry.contestant == c for r in runs)
    }
    return [make_row(scenario, c, p, picks) for c, p in picks.items()]


def make_row(scenario: str, contestant: str, p: Pick, picks: dict[str, Pick]) -> Row:
    if not p.ok:
        return Row(scenario, contestant, failure_text(p.failed[0]))
    row = FIGURES.get(scenario, figure_io)(scenario, contestant, p, picks)
    peer_note = p.ok[0].extra.get("note", "")
    notes = [p.entry.note, _variant_note(p), peer_note, row.note, _failure_note(p)]
    row.note = "; ".join(n for n in notes if n)
    return row


def failure_text(o: Outcome) -> str:
    if o.status == "skipped":
        return f"skipped ({o.message})"
    if o.status == "error":
        return f"error: {shorten(o.message)}"
    return o.status  # pending


def shorten(text: str, width: int = 90) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "(no message)"
    return line if len(line) <= width else line[: width - 1] + "…"


def _variant_note(p: Pick) -> str:
    if not p.variants:
        return ""
    tried = ", ".join(f"{v.partition('=')[2]}: {secs(s)}" for v, s in p.variants.items())
    return f"best {p.entry.variant} (tried {tried})"


def _failure_note(p: Pick) -> str:
    if not p.failed:
        return ""
    return f"{len(p.failed)} run(s) failed: {shorten(p.failed[0].message, 60)}"


def secs(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds:.2f} s"


def _reps(p: Pick) -> str:
    return f"median of {len(p.ok)}" if len(p.ok) > 1 else "1 run"


def figure_throughput(scenario: str, contestant: str, p: Pick, picks: dict[str, Pick]) -> Row:
    n = p.ok[0].n or 0
    rate = n / p.median
    return Row(scenario, contestant, f"{rate:,.0f} jobs/s", rate, f"{secs(p.median)}, {_reps(p)}")


def figure_cpu(scenario: str, contestant: str, p: Pick, picks: dict[str, Pick]) -> Row:
    serial = picks.get("serial")
    if serial is None or not serial.ok:
        return Row(scenario, contestant, f"{p.median:.2f} s", None, "no serial time: no speedup")
    speedup = serial.median / p.median
    iters = p.entry.params.get("iters", 0)
    note = f"{secs(p.median)} vs serial {secs(serial.median)}, iters={iters:,}, {_reps(p)}"
    return Row(scenario, contestant, f"{speedup:.2f}x speedup", speedup, note)


def figure_io(scenario: str, contestant: str, p: Pick, picks: dict[str, Pick]) -> Row:
    n = p.ok[0].n or 0
    rate = n / p.median
    return Row(
        scenario, contestant, f"{rate:,.0f} jobs/s", rate, f"wall {secs(p.median)}, {_reps(p)}"
    )


def figure_resume(scenario: str, contestant: str, p: Pick, picks: dict[str, Pick]) -> Row:
    note = f"watermark {RESUME_WATERMARK:,}, with last; {_reps(p)}"
    replays = [o.extra for o in p.ok if o.extra.get("without_last_s") is not None]
    if replays:
        without = statistics.median(e["without_last_s"] for e in replays)
        rates = [e["replay_rate"] for e in replays if e.get("replay_rate")]
        rate = f", replayed at {statistics.median(rates) / 1e6:.1f}M jobs/s" if rates else ""
        note += f"; without last: {without:.3f} s{rate}"
    return Row(scenario, contestant, f"{p.median:.3f} s to first job", p.median, note)


def figure_memory(scenario: str, contestant: str, p: Pick, picks: dict[str, Pick]) -> Row:
    traces = [o.memory for o in p.ok if o.memory and o.memory.samples]
    if not traces:
        return Row(scenario, contestant, "error: no memory samples")
    peaks = sorted(traces, key=lambda t: max(s[1] for s in t.samples))
    trace = peaks[len(peaks) // 2]  # the median run by peak
    peak = max(s[1] for s in trace.samples)
    hwm = max(s[2] for s in trace.samples)
    growth = _growth(trace)
    if trace.capped:
        return Row(
            scenario,
            contestant,
            f">{trace.cap_mib:,.0f} MiB (capped, growing)",
            peak,
            _memory_note(trace, p, hwm, growth),
            lower_bound=True,
        )
    return Row(
        scenario, contestant, f"{peak:,.0f} MiB peak RSS", peak, _memory_note(trace, p, hwm, growth)
    )


def _growth(trace: MemoryTrace) -> float | None:
    at_two = next((s[1] for s in trace.samples if s[0] >= 2.0), None)
    if at_two is None or trace.samples[-1][0] < 2.0 + SAMPLE_EVERY:
        return None
    return round((trace.samples[-1][1] - at_two) / at_two, 2) or 0.0  # no "-0%"


def _memory_note(trace: MemoryTrace, p: Pick, hwm: float, growth: float | None) -> str:
    parts = [f"HWM {hwm:,.0f} MiB"]
    if growth is not None:
        shape = "flat" if growth < FLAT_GROWTH else "growing"
        parts.append(f"{shape} ({growth:+.0%} from 2 s to end)")
    elapsed = trace.samples[-1][0]
    done = f"{trace.done:,} jobs " if trace.done is not None else ""
    if trace.exited:
        seconds = p.ok[0].seconds
        parts.append(f"finished {done}in {seconds or elapsed:.1f} s")
    else:
        parts.append(
            f"{done}done when stopped at {elapsed:.1f} s" if done else f"stopped at {elapsed:.1f} s"
        )
    return ", ".join(parts) + (f", {_reps(p)}" if len(p.ok) > 1 else "")


FigureFn = Callable[[str, str, Pick, dict[str, Pick]], Row]
FIGURES: dict[str, FigureFn] = {
    "throughput": figure_throughput,
    "cpu": figure_cpu,
    "memory": figure_memory,
    "resume": figure_resume,
}


def ratio(row: Row, rows: list[Row]) -> str:
    tm = next(
        (r for r in rows if r.scenario == row.scenario and r.contestant == "taskmaster"), None
    )
    if tm is None or tm.value is None or row.value is None or tm.value == 0:
        return "-"
    prefix = ">" if row.lower_bound and not tm.lower_bound else ""
    return f"{prefix}{row.value / tm.value:.2f}x"


UNITS = {
    "throughput": "jobs/s, higher is better",
    "cpu": "speedup over serial, higher is better",
    "memory": "MiB peak RSS of the coordinator, lower is better",
    "io-sleep": "jobs/s, higher is better",
    "io-async": "jobs/s, higher is better",
    "resume": "seconds to first dispatched job, lower is better",
}


def render(rows: list[Row]) -> str:
    header = ["scenario", "contestant", "figure", "vs taskmaster", "note"]
    table = [header] + [[r.scenario, r.contestant, r.figure, ratio(r, rows), r.note] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    out = []
    for i, line in enumerate(table):
        cells = [cell.ljust(w) for cell, w in zip(line, widths, strict=False)] + [line[-1]]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  ----")
    legend = [f"  {name}: {UNITS[name]}" for name in dict.fromkeys(r.scenario for r in rows)]
    out += ["", "vs taskmaster = figure / taskmaster's figure; units:", *legend]
    return "\n".join(out)


# -------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> Config:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS + list(ALIASES),
        help="run only this scenario (repeatable); default: all",
    )
    ap.add_argument("--quick", action="store_true", help="smaller sizes and 1 repeat")
    ap.add_argument("--repeat", type=int, help="runs per contestant, median (default 3)")
    ap.add_argument("--json", type=Path, dest="json_path", help="also dump raw results here")
    ap.add_argument(
        "--timeout", type=float, default=600.0, help="hard cap on one run in seconds (default 600)"
    )
    ap.add_argument("--memory-seconds", type=float, help="memory: wall-time cap (default 10)")
    ap.add_argument(
        "--memory-cap-mib",
        type=float,
        default=2048.0,
        help="memory: stop a peer whose RSS passes this (default 2048)",
    )
    ap.add_argument("--tm-args", default="", help='extra args for every tm-run, e.g. "--size 500"')
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    chosen = [s for name in (args.scenario or SCENARIOS) for s in ALIASES.get(name, [name])]
    return Config(
        sizes=sizes,
        repeat=max(1, args.repeat or sizes.repeat),
        timeout=args.timeout,
        memory_seconds=args.memory_seconds or sizes.memory_seconds,
        memory_cap_mib=args.memory_cap_mib,
        tm_args=shlex.split(args.tm_args),
        scenarios=list(dict.fromkeys(chosen)),
        json_path=args.json_path,
    )


def dump_json(path: Path, cfg: Config, runs: list[Run], rows: list[Row]) -> None:
    doc = {
        "config": {**asdict(replace(cfg, json_path=None)), "python": sys.version},
        "runs": [asdict(r) for r in runs],
        "rows": [{**asdict(r), "vs_taskmaster": ratio(r, rows)} for r in rows],
    }
    path.write_text(json.dumps(doc, indent=2, default=str))


def compile_sources() -> None:
    """Byte-compile src/ and bench/ once, as ``pip install`` does for every peer's package.

    Without it, a PYTHONDONTWRITEBYTECODE environment makes each taskmaster run compile its
    own modules from source (some 10 ms) inside the clock, which no installed peer pays.
    """
    for directory in (REPO_SRC / "taskmaster", BENCH_DIR):
        depth = 0 if directory == BENCH_DIR else 10
        compileall.compile_dir(str(directory), quiet=1, maxlevels=depth)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    compile_sources()
    runs: list[Run] = []
    rows: list[Row] = []
    for scenario in cfg.scenarios:
        scenario_runs = run_scenario(scenario, cfg)
        runs += scenario_runs
        rows += summarize(scenario, scenario_runs)
    print(render(rows))
    if cfg.json_path:
        dump_json(cfg.json_path, cfg, runs, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
