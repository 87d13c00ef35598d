"""What a person sees: the live screen on a real pseudo-terminal, the log off a terminal,
the final summary, and ``tm status`` from another terminal.

The live screen is read the way a terminal shows it: ``tm-run`` writes to the slave side of a
pty, and :class:`Screen` (a small VT100 subset: cursor moves, erases, scrolling) replays its
output into rows of text. Slow jobs wait for a file the test creates, never for a clock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Processes, wait_until

pytestmark = pytest.mark.timeout(90)

ROWS, COLS = 24, 110

# 600 jobs: #40 waits for the test's go-ahead (the stall), three raise, the rest take 2 ms.
SCREEN_TASKS = """
import os, time

SLOW = {slow}
FAILING = {{100, 200, 300}}

def count_jobs(n="600", **kwargs):
    return int(n)

def get_jobs(n="600", last=None, **kwargs):
    yield from range(last or 0, int(n))

def handle_job(job):
    if job == SLOW:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.environ["TM_TEST_RELEASE"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        return
    if job in FAILING:
        raise ValueError(f"job {{job}} is bad")
    time.sleep({sleep})
"""


def write_screen_tasks(directory: Path, *, slow: int = 40, sleep: float = 0.002) -> Path:
    path = directory / "tasks.py"
    path.write_text(SCREEN_TASKS.format(slow=slow, sleep=sleep))
    return path


def terminal_env(release: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RICH_OVERRIDES}
    env.update(TERM="xterm-256color", LANG="C.UTF-8", TM_TEST_RELEASE=str(release))
    return env


# Variables that would make rich ignore the terminal it is given.
RICH_OVERRIDES = {
    "COLUMNS",
    "LINES",
    "NO_COLOR",
    "FORCE_COLOR",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
    "JUPYTER_COLUMNS",
    "JUPYTER_LINES",
}


class Screen:
    """The visible text of a terminal of ``rows`` x ``cols`` fed with a program's output."""

    CSI = re.compile(r"\x1b\[([?0-9;]*)([A-Za-z])")
    OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.grid = [[" "] * cols for _ in range(rows)]
        self.row = self.col = 0
        self.raw = ""
        self._pending = ""
        self._lock = threading.Lock()

    def feed(self, text: str) -> None:
        with self._lock:
            self.raw += text
            data = self._pending + text
            self._pending = ""
            i = 0
            while i < len(data):
                ch = data[i]
                if ch == "\x1b":
                    match = self.CSI.match(data, i) or self.OSC.match(data, i)
                    if match is None:
                        self._pending = data[i:]  # an escape split across reads
                        return
                    if match.re is self.CSI:
                        self._csi(match.group(1), match.group(2))
                    i = match.end()
                    continue
                self._char(ch)
                i += 1

    def _char(self, ch: str) -> None:
        if ch == "\r":
            self.col = 0
        elif ch == "\n":
            self._line_feed()
        elif ch == "\b":
            self.col = max(self.col - 1, 0)
        elif ch >= " ":
            if self.col >= self.cols:  # deferred wrap, as xterm does
                self.col = 0
                self._line_feed()
            self.grid[self.row][self.col] = ch
            self.col += 1

    def _line_feed(self) -> None:
        if self.row == self.rows - 1:
            del self.grid[0]
            self.grid.append([" "] * self.cols)
        else:
            self.row += 1

    def _csi(self, params: str, final: str) -> None:
        if params.startswith("?"):
            return  # cursor visibility and other modes
        args = [int(p) if p else 0 for p in params.split(";")] if params else []
        n = max(args[0], 1) if args else 1
        if final == "A":
            self.row = max(self.row - n, 0)
        elif final == "B":
            self.row = min(self.row + n, self.rows - 1)
        elif final == "C":
            self.col = min(self.col + n, self.cols - 1)
        elif final == "D":
            self.col = max(self.col - n, 0)
        elif final == "G":
            self.col = min(n - 1, self.cols - 1)
        elif final == "H":
            self.row = min((args[0] if args else 1) - 1, self.rows - 1)
            self.col = min((args[1] if len(args) > 1 else 1) - 1, self.cols - 1)
        elif final == "K":
            mode = args[0] if args else 0
            line = self.grid[self.row]
            lo, hi = {0: (self.col, self.cols), 1: (0, self.col + 1)}.get(mode, (0, self.cols))
            line[lo:hi] = [" "] * (hi - lo)
        elif final == "J" and (args[0] if args else 0) == 2:
            self.grid = [[" "] * self.cols for _ in range(self.rows)]

    def text(self) -> str:
        with self._lock:
            return "\n".join("".join(line).rstrip() for line in self.grid).strip("\n")


class PtyRun:
    """A command on the slave side of a fresh pty, its output replayed into a Screen."""

    def __init__(self, procs: Processes, *args: str, env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.screen = Screen(ROWS, COLS)
        self.frames: list[str] = []
        self._master = master
        try:
            self.proc = procs.start(*args, env=env, stdin=slave, stdout=slave, stderr=slave)
        finally:
            os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError as exc:  # EIO: every writer closed the slave
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            self.screen.feed(data.decode("utf-8", "replace"))
        os.close(self._master)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Poll the screen until ``pattern`` shows; keep every distinct frame seen."""
        found: list[re.Match[str]] = []

        def shows() -> bool:
            text = self.screen.text()
            if not self.frames or self.frames[-1] != text:
                self.frames.append(text)
            match = re.search(pattern, text)
            if match:
                found.append(match)
            return bool(match)

        try:
            wait_until(shows, timeout=timeout)
        except AssertionError:
            text = self.screen.text()
            raise AssertionError(f"{pattern!r} never shown; screen:\n{text}") from None
        return found[0]

    def finish(self, timeout: float = 30.0) -> int:
        status = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return status


def test_live_screen_shows_bar_eta_failures_and_the_stalled_job(
    procs: Processes, tmp_path: Path
) -> None:
    write_screen_tasks(tmp_path)
    release = tmp_path / "release"
    run = PtyRun(procs, "tm-run", "tasks.py", "2", env=terminal_env(release))

    # Job 40 holds the run open: the other worker does the rest, then the screen shows both
    # the three failures and the stall, for as long as the test wants.
    stall = run.wait_for(r"(?s)failed 3 .*oldest job 40 on (\S+):(\d+) running for (\d+(?:\.\d)?)s")
    assert float(stall.group(3)) >= 3.0, "the stall line waits until the job is really old"
    screen = run.screen.text()
    assert "━" in screen, screen
    assert re.search(r"\d[\d,]*/600 · \d+\.\d%", screen), screen
    assert "workers 2" in screen, screen
    assert "WARNING" in screen and "failed job=100" in screen, "logs go above the display"
    # While jobs were flowing, the headline had a rate and an ETA.
    eta = re.compile(r"\d[\d,]*/600 · \d+\.\d% · [\d,.]+/s · eta \d")
    assert any(eta.search(frame) for frame in run.frames), "\n\n".join(run.frames[-5:])

    release.touch()
    assert run.finish() == 1  # three jobs failed
    final = run.screen.text()
    assert "done: 597 jobs in" in final, final
    assert "3 jobs failed: list them with `tm failures tasks.py`" in final, final
    assert "597/600 · 99.5%" in final, "the last frame shows the final numbers"
    last_frame = final.split("done: 597")[0].splitlines()[-3:]
    assert not any("oldest job" in line for line in last_frame), "the stall is over"
    # Log lines went above the display instead of through it: each starts a row of its own.
    for line in final.splitlines():
        if "WARNING" in line:
            assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ WARNING", line), final
    assert "\x1b[?25h" in run.screen.raw, "the cursor is shown again"


def test_workers_table(procs: Processes, tmp_path: Path) -> None:
    write_screen_tasks(tmp_path)
    release = tmp_path / "release"
    env = terminal_env(release)
    run = PtyRun(procs, "tm-run", "tasks.py", "2", "--workers-table", env=env)
    run.wait_for(r"worker\s+host\s+pid\s+done\s+rate\s+last seen")
    rows = run.wait_for(r"(?m)^\s*[0-9a-f]{8}\s+\S+\s+\d+\s+[\d,]+\s+")
    assert rows
    release.touch()
    assert run.finish() == 1


@pytest.fixture
def procs_in(tmp_path: Path) -> Iterator[Callable[[str], Processes]]:
    """``procs_in(name)``: a process starter working in ``tmp_path / name`` (created)."""
    made: list[Processes] = []

    def make(name: str) -> Processes:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        made.append(Processes(directory))
        return made[-1]

    try:
        yield make
    finally:
        for p in made:
            p.cleanup()


def _slow_run(procs: Processes, *extra: str) -> subprocess.Popen[bytes]:
    """400 jobs of 5 ms on 2 workers, three failing, #40 held until ``release`` exists."""
    write_screen_tasks(procs.cwd, sleep=0.005)
    env = {"TM_TEST_RELEASE": str(procs.cwd / "release")}
    return procs.start("tm-run", "tasks.py", "2", "n=400", *extra, env=env)


def _read_lines(proc: subprocess.Popen[bytes], into: list[str]) -> threading.Thread:
    def pump() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            into.append(raw.decode())

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def test_off_a_terminal_a_log_line_every_few_seconds_and_no_progress_silences_it(
    procs_in: Callable[[str], Processes], tmp_path: Path
) -> None:
    logged: list[str] = []
    quiet: list[str] = []
    log_run = _slow_run(procs_in("log"))
    quiet_run = _slow_run(procs_in("quiet"), "--no-progress")
    started = time.monotonic()
    pumps = [_read_lines(log_run, logged), _read_lines(quiet_run, quiet)]

    wait_until(lambda: any(line.startswith("taskmaster: ") for line in logged), timeout=30)
    wait_until(lambda: any("oldest job 40" in line for line in logged), timeout=30)
    progress = next(line for line in logged if re.match(r"taskmaster: \d", line))
    assert re.match(
        r"taskmaster: [\d,]+/400 done \(\d+\.\d%\) · [\d,./a-z]+ · eta \S+ · "
        r"buffered [\d,]+/10,000 · in flight \d+ · workers 2 · failed \d · retried 0 · "
        r"duplicates 0$",
        progress.rstrip("\n"),
    ), progress
    # The quiet run has been going for longer than the log interval too.
    wait_until(lambda: time.monotonic() - started > 6.0, timeout=30)
    for directory in ("log", "quiet"):
        (tmp_path / directory / "release").touch()
    assert log_run.wait(timeout=30) == 1
    assert quiet_run.wait(timeout=30) == 1
    for pump in pumps:
        pump.join(timeout=10)

    assert not any(line.startswith("taskmaster: ") for line in quiet), quiet
    for lines in (logged, quiet):
        text = "".join(lines)
        assert "\x1b[" not in text, "no escape codes off a terminal"
        assert re.search(
            r"^done: 397 jobs in \S+ \([\d,.]+/s\) · failed 3 · duplicates 0 · "
            r"state \.taskmaster/tasks-\w+\.db$",
            text,
            re.M,
        ), text
        assert "3 jobs failed: list them with `tm failures tasks.py n=400`" in text, text


def test_many_failing_jobs_do_not_stall_the_run(procs: Processes, write_tasks) -> None:
    # A job that raises must give its worker's credit back like any other. Jobs of a few ms
    # keep each worker's window small (a handful of jobs), so a credit lost per failure would
    # soon leave both workers with none: connected, idle, never sent another job.
    write_tasks(
        """
        import time

        def get_jobs(last=None):
            yield from range(last or 0, 300)

        def handle_job(job):
            time.sleep(0.005)
            if job % 10 == 0:
                raise ValueError(job)
        """
    )
    result = procs.run("tm-run", "tasks.py", "2", "--no-progress", timeout=30)
    assert result.returncode == 1, result.stderr
    assert "done: 270 jobs" in result.stderr
    assert "30 jobs failed" in result.stderr


def test_status_shows_rate_and_eta_while_running_and_watch_follows_to_the_end(
    procs: Processes, tmp_path: Path
) -> None:
    run = _slow_run(procs, "--no-progress")

    def running_with_eta() -> bool:
        out = procs.run("tm", "status", "tasks.py", "n=400", "--json")
        if out.returncode != 0:
            return False  # no state file yet
        data = json.loads(out.stdout)
        return bool(data["running"] and data["rate"] > 0 and data["eta_s"] is not None)

    wait_until(running_with_eta, timeout=30)
    text = procs.run("tm", "status", "tasks.py", "n=400").stdout
    assert re.search(r"^\.taskmaster/tasks-\w+\.db: running$", text, re.M), text
    assert re.search(r"^  done      [\d,]+/400 \(\d+\.\d%\)$", text, re.M), text
    assert re.search(
        r"^  rate      [\d,.]+/(s|min) · eta \S+ · in flight \d+ · workers 2$", text, re.M
    ), text
    assert re.search(r"^  updated   \S+ \([\d.ms]+ ago\)$", text, re.M), text

    watch = procs.start("tm", "status", "tasks.py", "n=400", "--watch", "0.2")
    seen: list[str] = []

    def pump() -> None:
        assert watch.stdout is not None
        for raw in watch.stdout:
            seen.append(raw.decode())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    wait_until(lambda: any(": running" in line for line in seen), timeout=30)
    (tmp_path / "release").touch()
    assert run.wait(timeout=30) == 1
    assert watch.wait(timeout=30) == 0
    reader.join(timeout=10)
    frames = "".join(seen).split("\n\n")
    assert len(frames) >= 2, "".join(seen)
    assert frames[0].splitlines()[0].endswith(": running")
    assert frames[-1].splitlines()[0].endswith(": complete")
    assert "  failed    3" in frames[-1]
